"""`rayft plan --device cpu` against measured peaks: the figures in data/memory_plan_measured.json were produced by

    .venv/bin/python benchmarks/memory_plan.py --seq 64 --json

(a random 1.03B-parameter Llama, 2 CPU workers, 2 training steps through rayft's own path, per worker the peak
resident memory above the worker's baseline before the model loads). The plan for each configuration, computed here
from the same model config and settings, must be within 25% of what was measured; and ZeRO-3 must have measured
well below ZeRO-0. No training runs here: the measured side is test data, the plan side is this code.
"""
import json
from pathlib import Path

import pytest

from rayft.cluster.config import load_config
from rayft.cluster.plan import estimate_memory, make_plan, read_model_shape

ROOT = Path(__file__).resolve().parents[3]
DATA = json.loads((Path(__file__).parent / "data" / "memory_plan_measured.json").read_text())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("memplan-model")
    (d / "config.json").write_text(json.dumps(DATA["model_config"]))
    return str(d)


def _cfg(model_dir, row):
    return load_config(ROOT / "examples" / "quickstart.yaml", [
        f"model.name_or_path={model_dir}", *DATA["sets"],
        f"train.deepspeed.zero_stage={row['zero_stage']}", f"train.deepspeed.offload_optimizer={str(row['offload']).lower()}"])


@pytest.mark.parametrize("row", DATA["rows"], ids=[r["config"] for r in DATA["rows"]])
def test_cpu_plan_within_25_percent_of_the_measured_peak(model_dir, row):
    cfg = _cfg(model_dir, row)
    planned = estimate_memory(cfg, read_model_shape(cfg.model, cfg.train.lora), device="cpu").total
    assert planned == pytest.approx(row["measured_peak_bytes"], rel=0.25), (planned, row)


def test_zero3_measured_well_below_zero0():
    by = {r["config"]: r["measured_peak_bytes"] for r in DATA["rows"]}
    assert by["z3"] < 0.7 * by["z0"] and by["z3-offload"] < 0.7 * by["z0"]


def test_plan_device_cpu_on_a_gpu_config_prints_host_memory(model_dir):
    cfg = _cfg(model_dir, {"zero_stage": 3, "offload": True}).model_copy()
    cfg.train.use_gpu = True
    text = make_plan(cfg, ROOT / "cluster.yaml", device="cpu")["text"]
    assert "host memory above the worker's idle baseline" in text and "--device cpu" in text
    assert "recommended:" not in text  # no GPU worker types for a host-memory plan
