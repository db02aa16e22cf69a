"""cluster.yaml's autoscaling, run: work the head cannot hold makes Ray's autoscaler add the node type `rayft plan`
recommends, and idle nodes are removed after the idle timeout.

The cluster is one `ray start --head` on loopback with `--autoscaling-config` built from the shipped cluster.yaml
(cluster/local_autoscaler.py: the same node type names, resources and limits, on Ray's fake multi-node provider,
whose nodes are local processes), cluster.yaml's autoscaler scorer (spot first, on-demand when spot is short) and
token authentication on; the head keeps cluster.yaml's `CPU: 0`. `gpu-1x-a10g-spot` is made unavailable, as AWS
refuses a spot request it has no capacity for. Everything the head and its autoscaler started is stopped by process
id (tests/autoscaling_helpers.py), never `ray stop`.

1. `rayft submit ... -- train`: a short training run on the tiny model (2 CPU workers, 4 steps) adds the CPU type
   the plan recommends; the job succeeds; the node is removed as idle once unused for the idle timeout.
2. GPU configs (GPUs are logical here; nothing runs CUDA): the placement group Ray Train asks for a 1-GPU and a
   4-GPU config gets the plan's spot type, or its on-demand fallback when that spot type cannot be launched. Then
   a spot reclaim notice (a fake instance metadata service) makes `rayft.cluster.spot_watch` drain the 4-GPU spot
   node with the notice's deadline; when the "cloud" takes the node at that deadline, Ray records it as preempted.
"""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayft.cluster.config import load_config
from rayft.cluster.plan import make_plan, plan_json
from tests.autoscaling_helpers import FakeMetadataService, autoscaling_cluster
from tests.cluster_helpers import _alive, _pids_with

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

VENV_BIN = Path(sys.executable).parent
RAYFT = str(VENV_BIN / "rayft")
REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
CONFIG = "examples/quickstart.yaml"
GPU_CONFIG = REPO / "examples" / "qwen2.5-1.5b-gpu.yaml"
JOB_SETS = ("tune=null", "data.max_seq_length=256", "train.max_steps=4", "train.eval_every_n_steps=4",
            "train.save_every_n_steps=4", "train.warmup_steps=0")
IDLE_TIMEOUT_MIN = 0.25  # 15 s instead of cluster.yaml's 10 minutes
UNAVAILABLE = ("gpu-1x-a10g-spot",)
JOB_TIMEOUT_S = 360
# The model config the GPU plans read (Qwen2.5-1.5B's dimensions; no weights are needed to plan).
QWEN2_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16",
}
# A Ray job that asks for each placement group in turn, as Ray Train asks for its workers, each once the worker nodes
# of the one before are gone, and reports where it went; with "hold", an actor (one CPU, no restarts) stays on that
# node until the file argv[2] appears or the node goes.
PLACEMENT_JOB = '''
import json, os, sys, time
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init()

@ray.remote(num_cpus=1, max_restarts=0)
class Holder:
    def ping(self):
        return True

def workers_alive():
    return [n for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"]]

for step in json.loads(sys.argv[1]):
    # from an empty cluster, as the plan assumes: idle nodes left by a step before would take bundles first
    deadline = time.time() + 120
    while workers_alive() and time.time() < deadline:
        time.sleep(1)
    pg = placement_group(step["bundles"], strategy=step["strategy"])
    assert pg.wait(timeout_seconds=240), f"placement group {step['name']} not placed"
    nodes = sorted(set(placement_group_table(pg)["bundles_to_node_id"].values()))
    print(f"placed {step['name']} on {' '.join(nodes)}", flush=True)
    holder = None
    if step.get("hold"):
        strategy = NodeAffinitySchedulingStrategy(nodes[0], soft=False)
        holder = Holder.options(scheduling_strategy=strategy).remote()
        ray.get(holder.ping.remote())
    remove_placement_group(pg)
    if holder is not None:
        print(f"holding {nodes[0]}", flush=True)
        deadline = time.time() + 240
        while not os.path.exists(sys.argv[2]) and time.time() < deadline:
            try:
                ray.get(holder.ping.remote(), timeout=5)
            except ray.exceptions.RayActorError:
                print(f"holder gone with node {nodes[0]}", flush=True)
                break
            time.sleep(1)
'''


@pytest.fixture(scope="module")
def cluster():
    with autoscaling_cluster("rfa-", CLUSTER_YAML, IDLE_TIMEOUT_MIN, UNAVAILABLE) as c:
        root = c.root
        yield c
    assert not [p for p in _pids_with(str(root)) if _alive(p)], "processes of the cluster left after its stop"


def _since(events: dict, t0: float) -> dict:
    return {k: [e for e in v if e[0] >= t0] for k, v in events.items()}


def _wait_idle_removal(cluster, added: list[dict], t0: float) -> dict:
    """Wait until no worker node is alive; every node in `added` must have been terminated by the idle rule once
    unused for the idle timeout (the log has whole seconds). Returns the autoscaler's events since t0."""
    left = cluster.wait_for_workers(0, timeout_s=IDLE_TIMEOUT_MIN * 60 + 90)
    events = _since(cluster.autoscaler_events(), t0)
    assert left == [], f"worker nodes still alive:\n{cluster.autoscaler_status()}\n{events}"
    terminated = {node_id: (reason, idle_s) for _, node_id, reason, idle_s in events["terminations"]}
    for n in added:
        reason, idle_s = terminated.get(n["node_id"], (None, None))
        assert reason == "idle" and idle_s >= IDLE_TIMEOUT_MIN * 60 - 1, (n, events)
    return events


def test_a_training_job_adds_the_planned_node_type_which_is_removed_when_idle(cluster, tiny_model_dir, tmp_path):
    storage = tmp_path / "runs"
    sets = [f"model.name_or_path={tiny_model_dir}", f"storage_path={storage}", *JOB_SETS]
    recommended = plan_json(make_plan(load_config(REPO / CONFIG, sets), CLUSTER_YAML))["recommended"]
    assert recommended, "rayft plan recommends no worker type for the job's config"

    nodes = cluster.alive_nodes()
    assert [n["is_head"] for n in nodes] == [True], nodes
    assert nodes[0]["resources_total"].get("CPU", 0) == 0, nodes  # the job's workers cannot run on the head
    assert nodes[0]["node_ip"] == "127.0.0.1", nodes

    started, submitted_at = time.monotonic(), time.time()
    job = subprocess.Popen(
        [RAYFT, "submit", CONFIG, "--address", cluster.dashboard, "--timeout-s", str(JOB_TIMEOUT_S), "--",
         "train", *[a for kv in sets for a in ("--set", kv)]],
        cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[str, dict] = {}  # worker node id -> its record and when it was first seen alive
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
                    seen.setdefault(n["node_id"], dict(n, seen_at=time.time()))
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

    events = _wait_idle_removal(cluster, added, submitted_at)
    gone_at = time.time()
    assert [e[1] for e in events["launches"]] == [recommended["worker_type"]] * recommended["nodes"], events
    assert recommended["worker_type"] not in cluster.autoscaler_status().split("Pending:")[0]
    started_at, _, requested_at = events["launches"][0]
    idle_s = next(e[3] for e in events["terminations"] if e[1] == added[0]["node_id"])
    print(f"\ntraining job {job_s:.0f} s from submission; {recommended['worker_type']} requested "
          f"{requested_at - submitted_at:.0f} s after submission, started by the provider {started_at - requested_at:.1f} s "
          f"later, seen alive {added[0]['seen_at'] - requested_at:.0f} s after the request (polled each second); idle "
          f"{idle_s:.0f} s when terminated; gone {gone_at - finished_at:.0f} s after the job ended")


def test_gpu_configs_get_the_planned_spot_type_or_its_fallback_and_a_reclaim_drains_it(cluster, tmp_path):
    from ray.job_submission import JobSubmissionClient

    model = tmp_path / "qwen2.5-1.5b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN2_1_5B))
    configs = {"1 gpu": ["train.num_workers=1", "train.global_batch_size=null"], "4 gpus": []}
    steps, expected = [], {}
    for name, sets in configs.items():
        cfg = load_config(GPU_CONFIG, [f"model.name_or_path={model}", *sets])
        rec = plan_json(make_plan(cfg, CLUSTER_YAML))["recommended"]
        assert rec and rec["nodes"] == 1 and rec["fallback"], (name, rec)
        # The 1-GPU config's spot type is the one this cluster cannot launch: its on-demand fallback should come.
        # The 4-GPU config's spot type can be launched: it should come, before its on-demand twin.
        assert (rec["worker_type"] in UNAVAILABLE) == (name == "1 gpu"), (name, rec)
        expected[name] = rec["fallback"] if rec["worker_type"] in UNAVAILABLE else rec["worker_type"]
        steps.append({"name": name, "strategy": cfg.train.placement_strategy,
                      "bundles": [{"CPU": cfg.train.cpus_per_worker, "GPU": 1}] * cfg.train.num_workers,
                      "hold": name == "4 gpus"})

    script, release = tmp_path / "placement_job.py", tmp_path / "release"
    script.write_text(PLACEMENT_JOB)
    client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})
    submitted_at = time.time()
    job_id = client.submit_job(entrypoint=f"python {script} '{json.dumps(steps)}' {release}")
    try:
        holding = _wait_for_log(client, job_id, "holding ", timeout_s=300)
        placed = {line.split(" on ")[0][len("placed "):]: line.split(" on ")[1].split()
                  for line in client.get_job_logs(job_id).splitlines() if line.startswith("placed ")}
        by_id = {n["node_id"]: n for n in cluster.nodes()}
        for name, node_ids in placed.items():
            assert [by_id[i]["type"] for i in node_ids] == [expected[name]], (name, node_ids, by_id)
        spot_node = holding.split()[1]

        # The reclaim notice, 5 s ahead: the watcher drains the node with that deadline, and Ray takes it down.
        reclaim_at = datetime.datetime.fromtimestamp(time.time() + 5, datetime.timezone.utc)
        imds = FakeMetadataService(reclaim_at=reclaim_at.strftime("%Y-%m-%dT%H:%M:%SZ"), notice_after_polls=1)
        try:
            watch = subprocess.run(
                [sys.executable, "-m", "rayft.cluster.spot_watch", "--address", cluster.gcs_address,
                 "--node-id", spot_node, "--metadata-url", imds.url, "--poll-s", "1"],
                env=cluster._node_env, capture_output=True, text=True, timeout=120)
        finally:
            imds.close()
        assert watch.returncode == 0 and "ray drain-node exit 0" in watch.stdout, watch.stdout + watch.stderr
        # A draining node keeps its running work (the holder) until it goes; at the deadline the cloud takes it.
        time.sleep(max(0.0, reclaim_at.timestamp() - time.time()))
        assert next(n for n in cluster.nodes() if n["node_id"] == spot_node)["state"] == "ALIVE"
        cluster.take_worker_node(spot_node)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            node = next(n for n in cluster.nodes() if n["node_id"] == spot_node)
            if node["state"] == "DEAD":
                break
            time.sleep(1)
        assert node["state"] == "DEAD" and "preemption" in node["state_message"], node
        assert "spot instance reclaimed" in node["state_message"], node
        _wait_for_log(client, job_id, "holder gone with node", timeout_s=60)
    finally:
        release.write_text("")
    status = _wait_job(client, job_id, timeout_s=120)
    assert status == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]

    events = _since(cluster.autoscaler_events(), submitted_at)
    assert [e[1] for e in events["launches"]] == [expected["1 gpu"], expected["4 gpus"]], events
    assert [t for _, t in events["failures"]] and {t for _, t in events["failures"]} <= set(UNAVAILABLE), events
    status_text = cluster.autoscaler_status()
    assert "InsufficientInstanceCapacity" in status_text, status_text
    on_demand = [n for n in cluster.nodes() if n["type"] == expected["1 gpu"]]
    _wait_idle_removal(cluster, on_demand, submitted_at)
    failed_at = events["failures"][0][0]
    (fallback_at, _, fallback_requested), (spot_at, _, spot_requested) = events["launches"]
    print(f"\n{UNAVAILABLE[0]} refused {failed_at - submitted_at:.0f} s after submission; {expected['1 gpu']} "
          f"requested {fallback_requested - failed_at:.1f} s after the refusal, started {fallback_at - fallback_requested:.1f} s "
          f"later; {expected['4 gpus']} requested {spot_requested - submitted_at:.0f} s after submission, started "
          f"{spot_at - spot_requested:.1f} s later")


def _wait_for_log(client, job_id: str, marker: str, timeout_s: float) -> str:
    """The first line of the job's log that starts with `marker`; fails if the job ends or time runs out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = client.get_job_logs(job_id)
        line = next((x for x in logs.splitlines() if x.startswith(marker)), None)
        if line:
            return line
        if str(client.get_job_status(job_id).value) in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    raise AssertionError(f"no {marker!r} in the job's log:\n{client.get_job_logs(job_id)[-3000:]}")


def _wait_job(client, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    return str(client.get_job_status(job_id).value)
