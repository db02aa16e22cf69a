"""Distributed LoRA training on a local Ray: 2 workers, DeepSpeed on gloo, the tiny model and the sample data.

One ZeRO-3 run is shared by several tests: mid-run, a real training worker process is killed with SIGKILL;
Ray Train restarts the worker group (FailureConfig) and the run must continue from the last checkpoint
and finish its planned steps. The same run then feeds the export, tracking and registry tests.
"""
import os
import signal
import threading
import time

import pytest

pytestmark = pytest.mark.slow

STEPS = 20


def _config(repo_root, model_dir, storage, name, *extra):
    from rayft.cluster.config import load_config

    return load_config(repo_root / "examples" / "quickstart.yaml", [
        f"name={name}", f"model.name_or_path={model_dir}", f"storage_path={storage}",
        "train.num_workers=2", f"train.max_steps={STEPS}", "train.micro_batch_size=2", "train.learning_rate=1e-2",
        "train.save_every_n_steps=5", "train.eval_every_n_steps=10", "train.warmup_steps=2",
        "train.keep_best_checkpoints=2", "data.max_seq_length=256", *extra])


def _training_workers():
    """Ray Train worker processes of the Ray this test process started (children of its raylet)."""
    import psutil
    import ray

    node = ray._private.worker._global_node
    raylet_pid = node.all_processes["raylet"][0].process.pid
    found = []
    for p in psutil.Process(raylet_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def killed_run(ray_local, repo_root, tiny_model_dir, tmp_path_factory):
    """A ZeRO-3 run in which one training worker is SIGKILLed after the first checkpoint."""
    from rayft.train.checkpoint import check_checkpoint, checkpoint_dir_name
    from rayft.train.trainer import run_training

    storage = str(tmp_path_factory.mktemp("train-runs"))
    cfg = _config(repo_root, tiny_model_dir, storage, "zero3-kill", "train.deepspeed.zero_stage=3")
    first = os.path.join(storage, cfg.name, checkpoint_dir_name(5))
    outcome, error, logs = {}, [], []

    def run():
        try:
            outcome["result"] = run_training(cfg, log=logs.append)
        except BaseException as e:  # reported by the test below
            error.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    killed = None
    deadline = time.time() + 600
    while time.time() < deadline and thread.is_alive() and killed is None:
        if os.path.isdir(first) and check_checkpoint(first) is None:
            workers = _training_workers()
            if workers:
                victim = workers[-1]
                killed = victim.pid
                os.kill(victim.pid, signal.SIGKILL)
                break
        time.sleep(0.1)
    thread.join(timeout=900)
    if error:
        raise error[0]
    return {"cfg": cfg, "out": outcome["result"], "killed_pid": killed, "logs": logs, "storage": storage}


def test_a_killed_worker_resumes_from_the_checkpoint_and_finishes(killed_run):
    assert killed_run["killed_pid"] is not None, "the run finished before a worker could be killed"
    m = killed_run["out"].metrics
    assert m["global_step"] == STEPS and m["total_steps"] == STEPS
    # The attempt that finished started from a checkpoint (a multiple of 5), not from step 0.
    assert m["start_step"] > 0 and m["start_step"] % 5 == 0, m
    assert any("resumed from checkpoint_step" in line for line in killed_run["logs"]), killed_run["logs"]


def test_mlflow_history_shows_restart_from_checkpoint(killed_run):
    from rayft.registry.tracking import client

    out = killed_run["out"]
    c = client(out.tracking_uri)
    starts = [h.value for h in c.get_metric_history(out.mlflow_run_id, "start_step")]
    assert starts[0] == 0 and max(starts) > 0
    history = c.get_metric_history(out.mlflow_run_id, "loss")
    steps = sorted({int(h.step) for h in history})
    assert steps == list(range(1, STEPS + 1))  # every planned step logged; replayed steps log again, none is missing
    # Steps run twice (after the checkpoint, before the kill) saw the same rows, RNG and optimizer state.
    by_step: dict = {}
    for h in history:
        by_step.setdefault(int(h.step), []).append(h.value)
    for step, values in by_step.items():
        assert max(values) - min(values) <= 1e-4 * abs(values[0]), (step, values)


def test_zero3_training_lowers_eval_loss(killed_run):
    m = killed_run["out"].metrics
    assert m["eval_loss"] < m["initial_eval_loss"] - 0.05, m


def test_checkpoint_layout_and_retention(killed_run):
    from rayft.train.checkpoint import check_checkpoint, step_of

    run_dir = killed_run["out"].run_dir
    kept = sorted(d for d in os.listdir(run_dir) if step_of(d) is not None)
    # best 2 by eval loss (steps 10 and 20 are evaluated) plus the latest; no more
    assert len(kept) <= 3 and kept[-1].endswith(f"{STEPS:08d}"), kept
    last = os.path.join(run_dir, kept[-1])
    assert check_checkpoint(last) is None
    for part in ("engine/latest", "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "state.json",
                 "rng/rank0.json", "rng/rank1.json", "manifest/rank0.json", "manifest/rank1.json"):
        assert os.path.isfile(os.path.join(last, part)), part
    engine_files = os.listdir(os.path.join(last, "engine", "state"))
    assert any("rank_0" in f for f in engine_files) and any("rank_1" in f for f in engine_files)


def test_mlflow_run_params_tags_and_artifacts(killed_run):
    from rayft.registry.tracking import client

    out = killed_run["out"]
    run = client(out.tracking_uri).get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert out.tracking_uri == f"sqlite:///{killed_run['storage']}/mlflow.db"
    assert run.data.params["train.deepspeed.zero_stage"] == "3" and run.data.params["train.lora.rank"] == "8"
    from rayft.train.trainer import read_run_file

    assert run.data.tags["dataset_fingerprint"] == read_run_file(out.run_dir)["dataset_fingerprint"]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s", "memory_rss_mb",
                "eval_loss", "eval_perplexity"):
        assert key in run.data.metrics, key
    arts = {a.path for a in client(out.tracking_uri).list_artifacts(out.mlflow_run_id)}
    assert {"data_report.json", "adapter"} <= arts


def test_registered_version_has_lineage(killed_run):
    from rayft.registry.versions import list_versions

    out = killed_run["out"]
    versions = list_versions(out.tracking_uri, killed_run["cfg"].name)
    assert versions and versions[-1]["version"] == out.registered.version
    tags = versions[-1]["tags"]
    assert tags["base_model"] == killed_run["cfg"].model.name_or_path and tags["peft_type"] == "LORA"
    assert tags["lora_rank"] == "8" and float(tags["eval_loss"]) == pytest.approx(out.metrics["eval_loss"])
    assert {"dataset_fingerprint", "duration_s", "kind"} <= set(tags)


def test_export_round_trip_adapter_and_merged(killed_run, tmp_path, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.train.export import export_run, probe_batch

    res = export_run(killed_run["out"].run_dir, str(tmp_path), merge=True, log=lambda _: None)
    assert res.max_abs_diff <= res.tolerance
    tok = AutoTokenizer.from_pretrained(res.adapter_dir)
    probe = probe_batch(tok)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), res.adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(res.merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert os.path.isfile(os.path.join(res.merged_dir, "model.safetensors"))
    assert os.path.isfile(os.path.join(res.merged_dir, "tokenizer.json"))
    with torch.no_grad():
        a, b, c = (m(**probe).logits for m in (peft_model, merged, base))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - c).abs().max() > 1e-3  # the adapter is trained, not an identity
