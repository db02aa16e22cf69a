"""The wheel runs anywhere: built from the project, installed into a fresh virtualenv that holds the dependencies
(the test venv's, through a path entry) but not the checkout, and used from an empty folder the way a new user
starts: --help, init, config validate, tiny-model, plan. Generic names (`data`, `train`) are not importable there:
everything lives under `rayft.`."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _run(cmd, cwd, env, timeout_s=300):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # Built from a copy: an in-tree build would leave build/ in the checkout, whose stale files a later wheel keeps.
    src = root / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "dist", "*.egg-info", ".rayft", "__pycache__", ".pytest_cache", ".hypothesis"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", src],
         root, env)
    [wheel] = list((root / "dist").glob("rayft-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], root, env)
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], root, env)
    # The dependencies come from the test venv's site-packages as a plain path entry: its .pth files (the
    # editable install of this checkout among them) are not processed there, so only the wheel provides rayft.
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (purelib / "zz_test_venv_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    env = dict(env, PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv))
    return venv, env, wheel


def test_wheel_holds_only_the_rayft_namespace(wheel_venv):
    import zipfile

    _, _, wheel = wheel_venv
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"rayft", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("rayft/examples/quickstart.yaml", "rayft/examples/data/support_qa.json", "rayft/cluster/cluster.yaml"):
        assert data in names, data


def test_commands_from_an_empty_folder(wheel_venv, tmp_path):
    venv, env, _ = wheel_venv
    py, rayft = venv / "bin" / "python", venv / "bin" / "rayft"
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run([py, "-c", "import rayft.cluster.cli as m; print(m.__file__)"], empty, env).stdout.strip()
    assert where.startswith(str(venv)) and not where.startswith(str(REPO)), where
    for generic in ("data", "train", "cluster", "serve", "tune"):
        out = subprocess.run([py, "-c", f"import {generic}"], cwd=empty, env=env, capture_output=True, text=True)
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, (generic, out.stderr)

    assert "quickstart" in _run([rayft, "--help"], empty, env).stdout
    out = _run([rayft, "init", "proj"], empty, env).stdout
    assert "rayft.yaml" in out
    proj = empty / "proj"
    assert {p.name for p in (proj / "data").iterdir()} >= {"support_qa.json", "chats.csv", "kb.jsonl"}
    assert (proj / "cluster.yaml").read_text() == (REPO / "cluster.yaml").read_text()
    again = subprocess.run([rayft, "init", "proj"], cwd=empty, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "already exist" in again.stderr and "--force" in again.stderr, again.stderr

    assert "valid" in _run([rayft, "config", "validate", "proj/rayft.yaml"], empty, env).stdout
    _run([rayft, "tiny-model", "runs/tiny-model"], proj, env)  # the folder the config names, inside the project
    assert (proj / "runs" / "tiny-model" / "model.safetensors").is_file()
    import json

    plan = json.loads(_run([rayft, "plan", "rayft.yaml", "--json"], proj, env).stdout)
    assert plan["model"] and plan["memory_per_gpu_bytes"]["total"] > 0, plan
    # --cluster defaults to the packaged cluster.yaml: the plan works without the project's copy too
    (proj / "cluster.yaml").unlink()
    _run([rayft, "plan", "rayft.yaml"], proj, env)
