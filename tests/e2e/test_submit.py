"""A rayft command as a Ray job on a real two-node local cluster, with token authentication on.

The cluster: `ray start --head` plus a second `ray start --address` node on this machine, every port a
free loopback port picked here, each node with its own short temp dir, HOME pointed at a private folder
(so the token, logs and sessions of the user's own Ray are never touched) and RAY_ADDRESS unset. The
token is generated the way a user does it (`ray get-auth-token --generate`, into that HOME) and both
nodes start with RAY_AUTH_MODE=token, so an unauthenticated request is refused (checked).

Two jobs are submitted: the training job (`train`) with the real `ray job submit` CLI (which sends the token
when RAY_AUTH_MODE=token), and the whole pipeline (`run`: data, train, export + merge, register + promote) with
`rayft submit` (which finds the token by itself). Both must succeed, leave their artifacts in the run folder
and a new version in the MLflow registry (SQLite under the storage path). The nodes are stopped by the process
ids of the processes they started (found by their private temp dir in /proc), never by `ray stop`.
"""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.cluster_helpers import _run, two_node_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
RAYFT = str(VENV_BIN / "rayft")
CONFIG = "examples/quickstart.yaml"
REPO = Path(__file__).resolve().parents[2]
# The jobs under test run `python -m rayft.cluster.cli <command> CONFIG --set ...` on the cluster: a short training
# run on the tiny model (2 workers, ZeRO-2, 4 steps), without the quickstart's search.
TRAIN_JOB = ("train",)
RUN_JOB = ("run",)
JOB_SETS = ("tune=null", "data.max_seq_length=256", "train.max_steps=4", "train.eval_every_n_steps=2",
            "train.save_every_n_steps=2", "train.warmup_steps=0")
# What a training run leaves in <storage>/quickstart, and what `run` adds.
TRAIN_OUTPUTS = ("rayft_run.json", "data_report.json", "rejects.jsonl", "adapter/adapter_model.safetensors")
RUN_OUTPUTS = TRAIN_OUTPUTS + ("export/adapter/adapter_model.safetensors", "export/merged/config.json")
LOG_MARKER = "step 4/4"  # the training progress, followed live
JOB_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def cluster():
    with two_node_cluster("rfj-") as c:
        yield c


def _job_args(command: tuple, model_dir: str, storage: Path) -> list[str]:
    sets = [f"model.name_or_path={model_dir}", f"storage_path={storage}", *JOB_SETS]
    return [*command, CONFIG, *[a for kv in sets for a in ("--set", kv)]]


def _check_outputs(storage: Path, expected: tuple) -> list[dict]:
    """The run folder's files, the rejects (the sample data has bad rows), and the registry's versions."""
    from mlflow.tracking import MlflowClient

    run_dir = storage / "quickstart"
    for rel in expected:
        assert (run_dir / rel).exists(), f"{run_dir / rel} missing; run folder holds {sorted(os.listdir(run_dir))}"
    rejects = (run_dir / "rejects.jsonl").read_text().splitlines()
    assert rejects and all(json.loads(line)["reason"] for line in rejects)
    run = json.loads((run_dir / "rayft_run.json").read_text())
    assert run["status"] == "finished" and run["metrics"]["global_step"] == 4, run
    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db", registry_uri=f"sqlite:///{storage}/mlflow.db")
    versions = client.search_model_versions("name = 'quickstart'")
    assert versions, f"no registered version of 'quickstart' in {storage}/mlflow.db"
    for v in versions:
        assert v.run_id == run["mlflow_run_id"] and v.tags["base_model"] == str(Path(run["config"]["model"]["name_or_path"]))
    return [dict(version=v.version, tags=dict(v.tags), aliases=list(getattr(v, "aliases", []) or [])) for v in versions]


def test_unauthenticated_requests_are_refused(cluster):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{cluster.dashboard}/api/jobs/", timeout=10)
    assert e.value.code in (401, 403)


def test_missing_or_wrong_token_is_explained(cluster):
    no_token = dict(cluster.env, HOME=str(cluster.root))  # a HOME without .ray/auth_token
    out = _run([RAYFT, "jobs", "list", "--address", cluster.dashboard], no_token, 60)
    assert out.returncode == 2 and "needs a token and none was found" in out.stderr, out.stderr
    wrong = dict(cluster.env, RAY_AUTH_TOKEN="not-the-token")
    out = _run([RAYFT, "jobs", "list", "--address", cluster.dashboard], wrong, 60)
    assert out.returncode == 2 and "refused the token" in out.stderr, out.stderr


def _runs_shipped_code(stdout: str) -> None:
    """The job imported rayft from its py_modules (unpacked by Ray), not from an install on the cluster."""
    line = next((x for x in stdout.splitlines() if "rayft code:" in x), "")
    assert "py_modules_files" in line and str(REPO) not in line, line or stdout[-3000:]


def test_ray_job_submit_cli(cluster, repo_root, tiny_model_dir, tmp_path):
    """The plain `ray job submit` equivalent of `rayft submit`, as the README gives it: `--dry-run` prints it."""
    import shlex

    storage = tmp_path / "runs-ray-cli"
    env = dict(cluster.env, RAY_AUTH_MODE="token")  # Ray's CLI attaches the token in token mode
    dry = _run([RAYFT, "submit", CONFIG, "--address", cluster.dashboard, "--dry-run", "--",
                *[a for a in _job_args(TRAIN_JOB, tiny_model_dir, storage) if a != CONFIG]], env, 60, cwd=repo_root)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    cmd = shlex.split(next(x for x in dry.stdout.splitlines() if x.startswith("ray job submit ")))
    assert "py_modules" in json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    out = _run([RAY, *cmd[1:]], env, JOB_TIMEOUT_S, cwd=repo_root)
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert "succeeded" in out.stdout.lower(), out.stdout[-2000:]
    assert LOG_MARKER in out.stdout, out.stdout[-3000:]
    _runs_shipped_code(out.stdout)
    versions = _check_outputs(storage, TRAIN_OUTPUTS)
    assert [v["tags"]["kind"] for v in versions] == ["adapter"], versions  # `train` registers its adapter


def test_rayft_submit_and_jobs(cluster, repo_root, tiny_model_dir, tmp_path):
    storage = tmp_path / "runs-rayft"
    env = dict(cluster.env)  # no RAY_AUTH_MODE: rayft finds the token in ~/.ray/auth_token by itself
    out = _run([RAYFT, "submit", CONFIG, "--address", cluster.dashboard, "--timeout-s", str(JOB_TIMEOUT_S), "--",
                *[a for a in _job_args(RUN_JOB, tiny_model_dir, storage) if a != CONFIG]], env, JOB_TIMEOUT_S + 30,
               cwd=repo_root)
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    job_id = next(line.split()[2] for line in out.stdout.splitlines() if line.startswith("submitted job "))
    assert f"job {job_id}: SUCCEEDED" in out.stdout
    assert LOG_MARKER in out.stdout  # the job's own output, followed live
    _runs_shipped_code(out.stdout)
    for stage in ("[1/5 data]", "[2/5 train]", "[3/5 export]", "[4/5 register]", "[5/5 serve]"):
        assert stage in out.stdout, f"{stage} missing from the job's output:\n{out.stdout[-3000:]}"
    versions = _check_outputs(storage, RUN_OUTPUTS)
    # `run` registers the merged model only, and the first version becomes champion (there was none).
    assert [v["tags"]["kind"] for v in versions] == ["merged"], versions
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{storage}/mlflow.db"
    champion = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("quickstart", "champion")
    assert champion.version == versions[0]["version"] and float(champion.tags["eval_loss"]) > 0
    assert "quickstart v1 -> @champion" in out.stdout, out.stdout[-3000:]

    listed = _run([RAYFT, "jobs", "list", "--address", cluster.dashboard], env, 60)
    assert listed.returncode == 0 and job_id in listed.stdout, listed.stdout + listed.stderr
    status = _run([RAYFT, "jobs", "status", job_id, "--exit-code", "--address", cluster.dashboard], env, 60)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stdout + status.stderr
    logs = _run([RAYFT, "jobs", "logs", job_id, "--address", cluster.dashboard], env, 60)
    assert logs.returncode == 0 and LOG_MARKER in logs.stdout, logs.stdout[-2000:] + logs.stderr
    missing = _run([RAYFT, "jobs", "status", "no-such-job", "--address", cluster.dashboard], env, 60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stderr


def test_rayft_submit_no_wait_then_stop_and_failure_exit_code(cluster, repo_root, tiny_model_dir, tmp_path):
    """--no-wait returns at once; `jobs stop` ends a job; a failing job gives a non-zero exit code."""
    env = dict(cluster.env)
    bad = _run([RAYFT, "submit", CONFIG, "--address", cluster.dashboard, "--timeout-s", "120", "--",
                *[a for a in _job_args(TRAIN_JOB, str(tmp_path / "no-model-here"), tmp_path) if a != CONFIG]],
               env, 150, cwd=repo_root)
    assert bad.returncode == 1 and "FAILED" in bad.stdout, bad.stdout[-3000:] + bad.stderr[-2000:]

    started = _run([RAYFT, "submit", CONFIG, "--address", cluster.dashboard, "--no-wait", "--",
                    *[a for a in _job_args(TRAIN_JOB, tiny_model_dir, tmp_path / "stopped") if a != CONFIG]], env, 60, cwd=repo_root)
    assert started.returncode == 0, started.stdout + started.stderr
    job_id = next(line.split()[2] for line in started.stdout.splitlines() if line.startswith("submitted job "))
    stopped = _run([RAYFT, "jobs", "stop", job_id, "--address", cluster.dashboard], env, 60)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = _run([RAYFT, "jobs", "status", job_id, "--address", cluster.dashboard], env, 60).stdout
        if "STOPPED" in st or "SUCCEEDED" in st or "FAILED" in st:
            break
        time.sleep(1)
    assert "STOPPED" in st or "SUCCEEDED" in st, st  # a very fast job may finish before the stop lands


def test_submit_refuses_a_config_outside_the_project(cluster, tmp_path, repo_root):
    outside = tmp_path / "c.yaml"
    outside.write_text((repo_root / CONFIG).read_text())
    out = _run([RAYFT, "submit", str(outside), "--address", cluster.dashboard, "--", "data", "prepare"],
               dict(cluster.env), 60, cwd=repo_root)
    assert out.returncode == 2 and "inside the project folder" in out.stderr, out.stderr
