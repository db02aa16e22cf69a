"""Every `examples/...` path that rayft's code names (in messages, hints and docstrings) exists in the package,
so a message never sends a user to a file that was renamed or removed."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("cluster", "data", "eval", "models", "registry", "security", "serve", "train", "tune")


def test_examples_paths_named_in_the_code_exist():
    named = {}
    for pkg in PACKAGES:
        for source in (ROOT / pkg).rglob("*.py"):
            for m in re.finditer(r"examples/[A-Za-z0-9_./-]*[A-Za-z0-9_]", source.read_text(encoding="utf-8")):
                named.setdefault(m.group(0), source.relative_to(ROOT).as_posix())
    assert "examples/security/policy.yaml" in named and "examples/quickstart.yaml" in named
    missing = {path: where for path, where in named.items() if not (ROOT / path).exists()}
    assert not missing, f"paths named in the code that do not exist: {missing}"
