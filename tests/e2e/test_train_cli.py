"""`rayft train` as a user runs it: a subprocess on the quickstart config and the tiny model.

The driver is killed (SIGKILL to its whole process group, local Ray included) after a checkpoint; running the
same command again continues from that checkpoint and finishes the planned steps in one MLflow run. Then
`rayft export --merge` on the result.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS = 15
RAYFT = str(Path(sys.executable).with_name("rayft"))


def _cmd(repo_root, model_dir, storage, *extra):
    return [RAYFT, "train", "examples/quickstart.yaml", "--set", f"model.name_or_path={model_dir}",
            "--set", f"storage_path={storage}", "--set", f"train.max_steps={STEPS}",
            "--set", "train.save_every_n_steps=5", "--set", "train.eval_every_n_steps=15",
            "--set", "train.learning_rate=1e-2", "--set", "data.max_seq_length=256", *extra]


def _start(cmd, cwd, log_path):
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log


def _kill_after_checkpoint(proc, run_dir, step, timeout_s=400):
    """SIGKILL the driver's process group once checkpoint `step` is intact; True if it was killed mid-run."""
    from rayft.train.checkpoint import check_checkpoint, checkpoint_dir_name

    target = os.path.join(run_dir, checkpoint_dir_name(step))
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(target) and check_checkpoint(target) is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return True
        time.sleep(0.1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return False


@pytest.fixture(scope="module")
def cli_run(repo_root, tiny_model_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("cli-runs")
    run_dir = str(storage / "quickstart")
    cmd = _cmd(repo_root, tiny_model_dir, storage)
    logs = []
    # Killed after checkpoint 5, then the same command again: it continues from there (`--resume` itself is
    # exercised in tests/integration/test_train_faults.py and below).
    for i, (extra, kill_at) in enumerate((([], 5), ([], None))):
        path = storage / f"run{i}.log"
        proc, fh = _start(cmd + extra, repo_root, path)
        try:
            if kill_at is not None:
                assert _kill_after_checkpoint(proc, run_dir, kill_at), f"run {i} ended before step {kill_at}:\n{path.read_text()}"
            else:
                proc.wait(timeout=600)
        finally:
            fh.close()
        logs.append((proc.returncode, path.read_text()))
    return {"storage": str(storage), "run_dir": run_dir, "logs": logs}


def test_rerun_and_resume_continue_from_the_last_checkpoint(cli_run):
    (_, first), (code, second) = cli_run["logs"]
    assert "resumed from" not in first
    assert code == 0, second
    assert "resumed from checkpoint_step" in second and f"finished {STEPS}/{STEPS} steps" in second, second
    run = json.loads(Path(cli_run["run_dir"], "rayft_run.json").read_text())
    assert run["status"] == "finished"
    assert run["metrics"]["global_step"] == STEPS and run["metrics"]["start_step"] >= 5


def test_progress_lines_on_the_driver(cli_run):
    last = cli_run["logs"][-1][1]
    assert f"step {STEPS}/{STEPS}" in last and "tokens/s" in last and "ETA" in last


def test_one_mlflow_run_with_metrics_and_checkpoint_files(cli_run):
    from rayft.registry.tracking import RUN_TAG, client

    c = client(f"sqlite:///{cli_run['storage']}/mlflow.db")
    exp = c.get_experiment_by_name("rayft")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = 'quickstart'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = c.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted({int(h.step) for h in history}) == list(range(1, STEPS + 1))
    m = runs[0].data.metrics
    assert m["eval_loss"] < m["initial_eval_loss"] - 0.05  # ZeRO-2: training helped
    ckpt = Path(cli_run["run_dir"], f"checkpoint_step{STEPS:08d}")
    assert (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (ckpt / "engine" / "state").is_dir() and (ckpt / "state.json").is_file()
    assert c.search_model_versions("name = 'quickstart'")


def test_export_cli_merged(cli_run, repo_root, tmp_path):
    from rayft.registry.versions import list_versions

    out = subprocess.run([RAYFT, "export", cli_run["run_dir"], "--out", str(tmp_path), "--merge",
                          "--register", "quickstart-merged"], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "max |diff|" in out.stdout
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    versions = list_versions(f"sqlite:///{cli_run['storage']}/mlflow.db", "quickstart-merged")
    assert len(versions) == 1 and versions[0]["tags"]["kind"] == "merged" and versions[0]["source"].endswith("export/merged")


def test_resume_without_checkpoint_is_a_clear_error(repo_root, tiny_model_dir, tmp_path):
    out = subprocess.run(_cmd(repo_root, tiny_model_dir, tmp_path, "--resume"), cwd=repo_root, capture_output=True,
                         text=True, timeout=300, start_new_session=True)
    assert out.returncode == 2, out.stderr
    assert "--resume" in out.stderr and "no intact checkpoint" in out.stderr


def test_qlora_on_cpu_is_refused_before_ray_starts(repo_root, tiny_model_dir, tmp_path):
    out = subprocess.run(_cmd(repo_root, tiny_model_dir, tmp_path, "--set", "model.quantization=4bit"), cwd=repo_root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "CUDA GPU" in out.stderr and "model.quantization: none" in out.stderr
    assert "started a local Ray" not in out.stdout
