"""The design's import table, checked on the source: each package imports only the packages its row allows, so
there is no cycle, `serve` never imports `train`, and nothing imports `cluster`."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
ALLOWED = {
    "data": set(),
    "security": set(),
    "models": {"security"},
    "registry": {"security"},
    "eval": {"data", "models", "registry"},
    "train": {"data", "security", "models", "registry", "eval"},
    "tune": {"train", "eval", "registry", "models", "data", "security"},
    "serve": {"models", "registry", "security"},
    "cluster": {"data", "security", "models", "registry", "eval", "train", "tune", "serve", "examples"},
}


def _imports_of(package: str) -> dict[str, set[str]]:
    """rayft packages imported by each file of `package` (absolute `rayft.x` and relative `..x` imports)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        depth = len(path.relative_to(ROOT / package).parts) - 1  # files in cluster/cli/ are one level down
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 0 and (node.module or "").startswith("rayft."):
                    found.add(node.module.split(".")[1])
                elif node.level > depth + 1 and node.module:
                    found.add(node.module.split(".")[0])  # `from ..train import x` out of this package
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("rayft.")}
        out[str(path.relative_to(ROOT))] = found - {package}
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_follow_the_table(package):
    wrong = {f: sorted(found - ALLOWED[package]) for f, found in _imports_of(package).items() if found - ALLOWED[package]}
    assert not wrong, f"{package}/ may import {sorted(ALLOWED[package]) or 'nothing of ours'}; found {wrong}"
