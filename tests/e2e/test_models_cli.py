"""`rayft models list|promote|rollback` on a real MLflow registry (SQLite), as a user runs it."""
import subprocess
import sys
from pathlib import Path

RAYFT = str(Path(sys.executable).with_name("rayft"))


def _rayft(*args):
    return subprocess.run([RAYFT, *args], capture_output=True, text=True, timeout=120)


def test_register_promote_rollback_round_trip(tmp_path):
    from mlflow.tracking import MlflowClient

    from rayft.registry.versions import register_version

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.create_experiment("rayft", artifact_location=f"file://{tmp_path}/mlartifacts")
    versions = []
    for loss in (2.5, 2.1, 2.3):
        run = c.create_run(exp)
        folder = tmp_path / f"adapter-{loss}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        c.log_artifacts(run.info.run_id, str(folder), artifact_path="adapter")
        versions.append(register_version(uri, "bot", run.info.run_id, "adapter",
                                         {"kind": "adapter", "eval_loss": loss}).version)
    assert versions == ["1", "2", "3"]

    assert _rayft("models", "promote", "bot", "1", "--tracking-uri", uri).returncode == 0
    out = _rayft("models", "promote", "bot", "2", "--tracking-uri", uri)
    assert out.returncode == 0 and "bot@champion -> v2 (was v1)" in out.stdout
    assert _rayft("models", "promote", "bot", "3", "--tracking-uri", uri).returncode == 0
    listing = _rayft("models", "list", "bot", "--tracking-uri", uri).stdout
    assert "v3" in listing and "champion" in listing and "eval_loss=2.3" in listing

    out = _rayft("models", "rollback", "bot", "--tracking-uri", uri)
    assert out.returncode == 0 and "v3 -> v2" in out.stdout, out.stdout + out.stderr
    assert str(c.get_model_version_by_alias("bot", "champion").version) == "2"
    out = _rayft("models", "rollback", "bot", "--tracking-uri", uri)
    assert "v2 -> v1" in out.stdout
    out = _rayft("models", "rollback", "bot", "--tracking-uri", uri)
    assert out.returncode == 2 and "no earlier version" in out.stderr

    out = _rayft("models", "promote", "bot", "9", "--tracking-uri", uri)
    assert out.returncode == 2 and "has no version '9'" in out.stderr
    out = _rayft("models", "rollback", "bot", "--alias", "canary", "--tracking-uri", uri)
    assert out.returncode == 2 and "no 'canary' alias" in out.stderr
