"""cluster.yaml's autoscaling, run: a job the head cannot hold makes Ray's autoscaler add the node type `rayft plan`
recommends, the job finishes there, and the idle node is removed after the idle timeout.

The cluster is one `ray start --head` on loopback with `--autoscaling-config` built from the shipped cluster.yaml
(cluster/local_autoscaler.py: the same node type names, resources and limits, on Ray's fake multi-node provider,
whose nodes are local processes) and token authentication on; the head keeps cluster.yaml's `CPU: 0`. The job is
`rayft submit ... -- train`: a short training run on the tiny model (2 CPU workers, 4 steps). Everything the head
and its autoscaler started is stopped by process id (tests/autoscaling_helpers.py), never `ray stop`.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayft.cluster.config import load_config
from rayft.cluster.plan import make_plan, plan_json
from tests.autoscaling_helpers import autoscaling_cluster
from tests.cluster_helpers import _alive, _pids_with

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

VENV_BIN = Path(sys.executable).parent
RAYFT = str(VENV_BIN / "rayft")
REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
CONFIG = "examples/quickstart.yaml"
JOB_SETS = ("tune=null", "data.max_seq_length=256", "train.max_steps=4", "train.eval_every_n_steps=4",
            "train.save_every_n_steps=4", "train.warmup_steps=0")
IDLE_TIMEOUT_MIN = 0.25  # 15 s instead of cluster.yaml's 10 minutes
JOB_TIMEOUT_S = 360


def test_a_job_adds_the_planned_node_type_which_is_removed_when_idle(tiny_model_dir, tmp_path):
    storage = tmp_path / "runs"
    sets = [f"model.name_or_path={tiny_model_dir}", f"storage_path={storage}", *JOB_SETS]
    cfg = load_config(REPO / CONFIG, sets)
    recommended = plan_json(make_plan(cfg, CLUSTER_YAML))["recommended"]
    assert recommended, "rayft plan recommends no worker type for the job's config"

    with autoscaling_cluster("rfa-", CLUSTER_YAML, IDLE_TIMEOUT_MIN) as cluster:
        root = cluster.root
        nodes = cluster.alive_nodes()
        assert [n["is_head"] for n in nodes] == [True], nodes
        assert nodes[0]["resources_total"].get("CPU", 0) == 0, nodes  # the job's workers cannot run on the head
        assert nodes[0]["node_ip"] == "127.0.0.1", nodes

        started, submitted_at = time.monotonic(), time.time()
        job = subprocess.Popen(
            [RAYFT, "submit", CONFIG, "--address", cluster.dashboard, "--timeout-s", str(JOB_TIMEOUT_S), "--",
             "train", *[a for kv in sets for a in ("--set", kv)]],
            cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen: dict[str, dict] = {}  # worker node id -> its record and when it first answered
        most_at_once = 0
        try:
            while job.poll() is None:
                try:
                    workers = cluster.worker_nodes()
                except OSError:  # the dashboard is busy; ask again
                    workers = None
                if workers is not None:
                    most_at_once = max(most_at_once, len(workers))
                    for n in workers:
                        seen.setdefault(n["node_id"], dict(n, added_after_s=time.monotonic() - started))
                time.sleep(1)
            output = job.stdout.read()
        finally:
            if job.poll() is None:
                job.kill()
        job_s, finished_at = time.monotonic() - started, time.time()
        assert job.returncode == 0, output[-5000:]
        assert "SUCCEEDED" in output and "step 4/4" in output, output[-3000:]

        added = list(seen.values())
        assert added, "the job succeeded without the autoscaler adding a node"
        assert {n["type"] for n in added} == {recommended["worker_type"]}, (recommended, added)
        assert len(added) == most_at_once == recommended["nodes"], (recommended, added)
        wanted_cpus = cluster.config["available_node_types"][recommended["worker_type"]]["resources"]["CPU"]
        for n in added:
            assert n["node_ip"] == "127.0.0.1", n
            assert n["resources_total"].get("CPU") == wanted_cpus, n

        left = cluster.wait_for_workers(0, timeout_s=IDLE_TIMEOUT_MIN * 60 + 90)
        gone_at = time.time()
        events = cluster.autoscaler_events()
        status = cluster.autoscaler_status()
        assert left == [], f"worker nodes still alive after the job:\n{status}\n{events}"
        assert [t for _, t in events["launches"]] == [recommended["worker_type"]] * recommended["nodes"], events
        terminated = {node_id: (reason, idle_s) for _, node_id, reason, idle_s in events["terminations"]}
        for n in added:  # removed by the idle rule, once unused for the idle timeout (the log has whole seconds)
            reason, idle_s = terminated.get(n["node_id"], (None, None))
            assert reason == "idle" and idle_s >= IDLE_TIMEOUT_MIN * 60 - 1, (n, events)
        assert recommended["worker_type"] not in status.split("Pending:")[0], status

        launch_at = events["launches"][0][0]
        up_s = submitted_at + added[0]["added_after_s"] - launch_at
        print(f"\njob {job_s:.0f} s from submission; {recommended['worker_type']} launched {launch_at - submitted_at:.0f} s "
              f"after submission, alive {up_s:.0f} s after its launch (polled each second); idle for {terminated[added[0]['node_id']][1]:.0f} s "
              f"when terminated; gone from the cluster {gone_at - finished_at:.0f} s after the job ended")

    assert not [p for p in _pids_with(str(root)) if _alive(p)], "processes of the cluster left after its stop"
