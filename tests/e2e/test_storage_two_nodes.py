"""Nodes that share nothing but object storage: a two-node loopback Ray cluster (tests/cluster_helpers.py), a real
S3 server (SeaweedFS, tests/s3_server.py) and a loopback `mlflow server` whose artifacts go to that S3.

Every stage runs `rayft` as a user does, from its own scratch folder, deleted before the next stage, so nothing
can depend on the driver's local disk:
1. `rayft run` with sources on S3 and `storage_path: s3://...`: data, a Ray Tune search with ASHA on the cluster,
   export + merge, a registry version whose artifacts are in the bucket.
2. `rayft serve --model models:/NAME@champion` fetches that version from S3 and answers.
3. `rayft train` with a Ray Train worker killed mid-run: the run continues from its S3 checkpoint and finishes;
   then the latest checkpoint in the bucket is damaged and `rayft train --resume` falls back to the previous one.
4. Node loss: the worker node (raylet, agents, its Ray Train worker) is killed mid-run; the run goes on with the
   same number of workers on the head, from its last S3 checkpoint.
5. Preemption: the worker node is drained mid-run (a spot reclaim notice), later the workers get SIGTERM; each time
   the run checkpoints at the next step boundary, stops, and resumes from there, losing at most one step.
The endpoint reaches every process through `storage.endpoint_url` in the config; the keys only through each
process's environment (never the config, logs or MLflow params, which the test checks).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.cluster_helpers import _children_of, _free_ports, ray_train_workers, two_node_cluster
from tests.s3_server import ACCESS_KEY, SECRET_KEY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

VENV_BIN = Path(sys.executable).parent
RAYFT = str(VENV_BIN / "rayft")
REPO = Path(__file__).resolve().parents[2]
BUCKET = "rayft-e2e"


@pytest.fixture(scope="module")
def cluster():
    with two_node_cluster("rfs-") as c:
        yield c


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    """`mlflow server` on loopback; clients write artifacts straight to the bucket (--no-serve-artifacts)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    s3_server.create_bucket(BUCKET)
    port = _free_ports(1)[0]
    env = dict(os.environ, **s3_server.env)
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--default-artifact-root", f"s3://{BUCKET}/mlartifacts", "--no-serve-artifacts"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            time.sleep(1)
    else:
        raise AssertionError(f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}")
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a loaded machine: its workers did not stop in time
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def s3_setup(s3_server, mlflow_server, tiny_model_dir):
    for name in ("support_qa.json", "chats.csv", "kb.jsonl", "tools_openai.jsonl", "tools_sharegpt.json"):
        s3_server.upload(REPO / "examples" / "data" / name, f"s3://{BUCKET}/data/{name}")
    return s3_server


def _config(folder: Path, cluster, s3, mlflow_uri: str, tiny_model_dir: str, name: str, **train) -> Path:
    cfg = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    cfg["name"] = name
    cfg["storage_path"] = f"s3://{BUCKET}/runs"
    cfg["storage"] = {"endpoint_url": s3.endpoint}
    cfg["model"]["name_or_path"] = tiny_model_dir  # a base model on every node's disk (a hub id on a real cluster)
    for src in cfg["data"]["sources"]:
        src["path"] = f"s3://{BUCKET}/data/{Path(src['path']).name}"
    cfg["data"]["max_seq_length"] = 256
    cfg["ray"] = {"address": cluster.gcs_address}
    cfg["tracking"] = {"tracking_uri": mlflow_uri}
    cfg["train"].update({"num_workers": 2, "cpus_per_worker": 0.5, "max_steps": 4, "eval_every_n_steps": 2,
                         "save_every_n_steps": 2, "warmup_steps": 0, "micro_batch_size": 2, **train})
    cfg["tune"] = None
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(cluster) -> dict:
    # The keys come from this environment (a node's own), the endpoint from the config; RAY_AUTH_MODE=token makes
    # the driver send the cluster's token (in the cluster's private HOME).
    env = dict(cluster.env, RAY_AUTH_MODE="token", AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    env.pop("AWS_ENDPOINT_URL", None)
    return env


def _rayft(args, cwd: Path, env: dict, timeout_s: int = 900) -> str:
    out = subprocess.run([RAYFT, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert out.returncode == 0, f"rayft {' '.join(map(str, args))}\n{out.stdout[-5000:]}\n{out.stderr[-5000:]}"
    return out.stdout + out.stderr


def _scratch(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


def test_pipeline_on_s3_then_serve_from_the_registry(cluster, s3_setup, mlflow_server, tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    s3, env = s3_setup, _env(cluster)
    work = _scratch(tmp_path, "run")
    cfg_path = _config(work, cluster, s3, mlflow_server, tiny_model_dir, "s3run")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["tune"] = {"num_samples": 1, "search_space": {"train.learning_rate": {"grid": [5e-3, 1e-7]}},
                   "asha": {"grace_period_steps": 2, "reduction_factor": 2}, "max_concurrent_trials": 1}
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = _rayft(["run", cfg_path], work, env)
    assert "joined Ray at " + cluster.gcs_address in out, out[-3000:]

    files = s3.list(f"s3://{BUCKET}/runs/s3run-search")
    for part in ("export/merged/config.json", "export/merged/rayft-manifest.json", "export/adapter/adapter_config.json"):
        assert f"{BUCKET}/runs/s3run-search/{part}" in files, (part, files[:40])
    trial_runs = [f for f in files if f.endswith("/rayft_run.json")]
    assert len(trial_runs) == 2, files[:40]  # both trials' run files in the bucket, none on the driver's disk
    assert any(f.endswith("/data_report.json") for f in files) and any(f.endswith("/rejects.jsonl") for f in files)
    assert not list(work.rglob("rayft_run.json")) and not (work / "runs").exists()

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    champion = client.get_model_version_by_alias("s3run", "champion")
    assert champion.source.startswith(f"s3://{BUCKET}/mlartifacts/") or "models:/" in champion.source, champion.source
    run = client.get_run(champion.run_id)
    assert run.info.artifact_uri.startswith(f"s3://{BUCKET}/mlartifacts/"), run.info.artifact_uri
    assert any(f.startswith(f"{BUCKET}/mlartifacts/") for f in s3.list(f"s3://{BUCKET}/mlartifacts"))
    secrets = (ACCESS_KEY, SECRET_KEY)
    assert not any(k in out for k in secrets)
    assert not any(k in json.dumps(run.data.params) for k in secrets)
    shutil.rmtree(work)

    # A new machine state: another scratch folder; the champion comes from the registry, its files from S3.
    serve_dir = _scratch(tmp_path, "serve")
    port = _free_ports(1)[0]
    out = _rayft(["serve", "--model", "models:/s3run@champion", "--tracking-uri", mlflow_server, "--port", port,
                  "--smoke-test"], serve_dir, dict(env, AWS_ENDPOINT_URL=s3.endpoint), timeout_s=600)
    assert "POST /v1/completions -> 200" in out, out[-3000:]


def _train_workers(cluster) -> list[int]:
    return ray_train_workers(_children_of(cluster.node_pids()))


def test_worker_kill_resumes_from_s3_and_damaged_latest_falls_back(cluster, s3_setup, mlflow_server, tiny_model_dir,
                                                                   tmp_path):
    s3, env = s3_setup, _env(cluster)
    work = _scratch(tmp_path, "train")
    cfg_path = _config(work, cluster, s3, mlflow_server, tiny_model_dir, "s3kill", max_steps=8, max_failures=2,
                       keep_best_checkpoints=10)
    log = open(work / "train.log", "w")
    proc = subprocess.Popen([RAYFT, "train", str(cfg_path)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    prefix = f"s3://{BUCKET}/runs/s3kill"
    killed = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and killed is None:
        # Once step 4's checkpoint appears, step 2's is complete (a report persists its checkpoint before training
        # goes on); a kill during an upload leaves a partial checkpoint, which resume skips (seen: back to step 0).
        if any("checkpoint_step00000004/state.json" in f for f in s3.list(prefix)):
            victims = _train_workers(cluster)
            if victims:
                killed = victims[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.5)
    assert proc.wait(timeout=900) == 0, (work / "train.log").read_text()[-5000:]
    text = (work / "train.log").read_text()
    assert killed is not None, "the run finished before a worker could be killed:\n" + text[-3000:]
    assert "resumed from checkpoint_step" in text, text[-5000:]
    run = json.loads(s3.filesystem().open_input_stream(f"{BUCKET}/runs/s3kill/rayft_run.json").read())
    assert run["status"] == "finished" and run["metrics"]["global_step"] == 8, run
    shutil.rmtree(work)

    # Damage the newest checkpoint in the bucket: --resume falls back to the one before it.
    fs = s3.filesystem()
    fs.delete_file(f"{BUCKET}/runs/s3kill/checkpoint_step00000008/manifest/rank1.json")
    work = _scratch(tmp_path, "resume")
    cfg_path = _config(work, cluster, s3, mlflow_server, tiny_model_dir, "s3kill", max_steps=10, keep_best_checkpoints=10)
    out = _rayft(["train", cfg_path, "--resume"], work, env)
    assert "checkpoint_step00000008" in out and "not usable" in out, out[-4000:]
    assert "resumed from checkpoint_step00000006" in out, out[-4000:]


def test_node_loss_goes_on_with_the_same_workers_on_the_remaining_node(cluster, s3_setup, mlflow_server,
                                                                      tiny_model_dir, tmp_path):
    """The worker node disappears mid-run (every process of it SIGKILLed). Ray Train restarts the worker group on
    the head (2 workers of half a CPU fit there) from the last checkpoint in the bucket, and the run finishes. The
    shards are cut from the rows and the worker count alone (train/shards.py), so each rank reads the same rows as
    before the loss."""
    s3, env = s3_setup, _env(cluster)
    work = _scratch(tmp_path, "nodeloss")
    cfg_path = _config(work, cluster, s3, mlflow_server, tiny_model_dir, "nodeloss", max_steps=8, max_failures=2,
                       keep_best_checkpoints=10, placement_strategy="SPREAD")
    log = open(work / "train.log", "w")
    proc = subprocess.Popen([RAYFT, "train", str(cfg_path)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    prefix = f"s3://{BUCKET}/runs/nodeloss"
    lost, on_worker = False, []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None and not lost:
            if any("checkpoint_step00000004/state.json" in f for f in s3.list(prefix)):
                on_worker = ray_train_workers(cluster.worker_node_pids())
                assert on_worker, "SPREAD placed no Ray Train worker on the worker node"
                cluster.lose_worker_node()
                lost = True
            time.sleep(0.5)
        assert proc.wait(timeout=900) == 0, (work / "train.log").read_text()[-5000:]
        text = (work / "train.log").read_text()
        assert lost, "the run finished before the node could be lost:\n" + text[-3000:]
        assert "resumed from checkpoint_step" in text and "resumed from checkpoint_step00000000" not in text, text[-5000:]
        run = json.loads(s3.filesystem().open_input_stream(f"{BUCKET}/runs/nodeloss/rayft_run.json").read())
        assert run["status"] == "finished" and run["metrics"]["global_step"] == 8, run
        assert run["config"]["train"]["num_workers"] == 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if lost:
            cluster.restore_worker_node()  # the module's other tests get their two nodes back


STEP_LINE = re.compile(r"^step (\d+)/\d+", re.M)
RESUMED_LINE = re.compile(r"^resumed from checkpoint_step\d+ at step (\d+)", re.M)


def preemption_restarts(text: str) -> list[dict]:
    """Each resume in a `rayft train` log: the step it resumed at, the furthest step reached before it (the steps a
    restart loses are the difference), and the preemption line that came before it, if any."""
    events, furthest, notice = [], 0, None
    for line in text.splitlines():
        if m := STEP_LINE.match(line):
            furthest = max(furthest, int(m.group(1)))
        elif line.startswith("preemption: "):
            notice = line
        elif m := RESUMED_LINE.match(line):
            events.append({"resumed_at": int(m.group(1)), "furthest": furthest, "notice": notice})
            furthest, notice = int(m.group(1)), None
    return events


def _wait_for(pattern: str, log: Path, proc, timeout_s: float = 600, after: int = 0) -> str:
    """The log once a line matching `pattern` appears past character `after` (the run must still be going)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text()
        if re.search(pattern, text[after:], re.M):
            return text
        assert proc.poll() is None, f"the run ended before '{pattern}':\n{text[-5000:]}"
        time.sleep(0.3)
    raise AssertionError(f"no '{pattern}' in {timeout_s}s:\n{log.read_text()[-5000:]}")


def test_preemption_drain_then_sigterm_each_lose_at_most_one_step(cluster, s3_setup, mlflow_server, tiny_model_dir,
                                                                   tmp_path):
    """No checkpoint but the preemptions' own and the last one (every 1000 steps, past the run's end), so anything
    resumed past step 0 is a preemption's checkpoint. The run is long enough (400 steps) for a drain notice, which
    Ray Train's watcher polls for every 5 s, to find it still going: the tiny model trains several steps a second.

    1. `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` on the worker node (what the autoscaler and spot
       integrations send): Ray Train's watcher tells every worker; they checkpoint at the next step boundary, stop,
       and the group restarts on the head alone (a draining node takes no new work).
    2. SIGTERM to every Ray Train worker (now on the head): the same, noticed by the workers' own handler."""
    s3, env = s3_setup, _env(cluster)
    work = _scratch(tmp_path, "preempt")
    cfg_path = _config(work, cluster, s3, mlflow_server, tiny_model_dir, "preempt", max_steps=400, max_failures=3,
                       save_every_n_steps=1000, eval_every_n_steps=1000, logging_every_n_steps=1,
                       placement_strategy="SPREAD")
    log_path = work / "train.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([RAYFT, "train", str(cfg_path)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    t0 = time.monotonic()
    try:
        _wait_for(r"^step 2/", log_path, proc)
        print(f"step 2 at {time.monotonic() - t0:.0f}s")
        assert ray_train_workers(cluster.worker_node_pids()), "SPREAD placed no Ray Train worker on the worker node"
        cluster.drain_worker_node(deadline_s=120)
        text = _wait_for(r"^resumed from checkpoint_step", log_path, proc)
        print(f"resumed after the drain at {time.monotonic() - t0:.0f}s")
        assert not ray_train_workers(cluster.worker_node_pids()), "the restarted group used the draining node"
        resumed = RESUMED_LINE.findall(text)[-1]
        text = _wait_for(rf"^step {int(resumed) + 2}/", log_path, proc, after=text.rindex("resumed from"))
        victims = _train_workers(cluster)
        assert victims, "no Ray Train worker to send SIGTERM to"
        for pid in victims:
            os.kill(pid, signal.SIGTERM)
        print(f"SIGTERM at {time.monotonic() - t0:.0f}s")
        assert proc.wait(timeout=900) == 0, log_path.read_text()[-5000:]
        print(f"finished at {time.monotonic() - t0:.0f}s")
        text = log_path.read_text()
        events = preemption_restarts(text)
        # Seen once under load: a third restart without a notice, straight after the SIGTERM one, at the same step
        # (nothing lost). Every restart must lose at most one step; the two notices must each have made one.
        noticed = [e for e in events if e["notice"]]
        assert len(noticed) == 2, text[-6000:]
        drain, term = noticed
        assert drain["notice"] and "drain of node" in drain["notice"], text[-6000:]
        assert term["notice"] and "SIGTERM" in term["notice"], text[-6000:]
        for e in events:
            assert e["resumed_at"] >= 2 and e["furthest"] - e["resumed_at"] <= 1, (e, text[-6000:])
        run = json.loads(s3.filesystem().open_input_stream(f"{BUCKET}/runs/preempt/rayft_run.json").read())
        assert run["status"] == "finished" and run["metrics"]["global_step"] == 400, run
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        # A drained node takes no new work. This is the module's last test, so the node is left as it is (bringing a
        # fresh one costs about 40 s); a test added after it would need `lose_worker_node` + `restore_worker_node`.
