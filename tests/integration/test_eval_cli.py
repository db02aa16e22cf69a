"""`rayft eval` as a user runs it (a subprocess), on toy adapters whose greedy answers are known (conftest.py).

The golden set asks the adapters' training prompts, with adapter A's answer as the reference, plus questions no
adapter was taught. Checks: per-example results and the summary in the run's eval folder, the aggregates in
MLflow, lm-eval on a local multiple-choice task, `--compare` with its paired bootstrap interval and the examples
that changed, results written to an S3 run storage, and errors that name the value and the fix.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import ANSWER_A, ANSWER_B

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RAYFT = str(Path(sys.executable).with_name("rayft"))
TASK_DIR = Path(__file__).parent / "eval_task"
GOLDEN = [("hello", ANSWER_A), ("What are your opening hours?", ANSWER_A),
          ("How do I reset my password?", "Use the reset link on the sign-in page."),
          ("Where is the office?", "On the third floor.")]


def _config(tmp_path, tiny_model_dir, storage_path, **eval_extra) -> Path:
    golden = tmp_path / "golden.jsonl"
    golden.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GOLDEN))
    cfg = {"name": "ev", "storage_path": storage_path, "model": {"name_or_path": tiny_model_dir},
           "data": {"sources": [{"path": str(golden), "schema": "qa"}]},
           "eval": {"sources": [{"path": str(golden), "schema": "qa"}], "max_new_tokens": 16,
                    "metrics": ["exact_match", "token_f1", "rouge_l"], **eval_extra}}
    if "://" in storage_path:
        cfg["tracking"] = {"enabled": False}
    path = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rayft(*args, env=None, cwd=None):
    return subprocess.run([RAYFT, *args], capture_output=True, text=True, timeout=400, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_eval_one_model_with_lm_eval(toy_adapters, tiny_model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    cfg = _config(tmp_path, tiny_model_dir, str(tmp_path / "runs"), lm_eval={"tasks": [str(TASK_DIR)]})
    out = _rayft("eval", str(cfg), "--model", toy_adapters["a"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "ev" / "eval" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["golden:1", "golden:2", "golden:3", "golden:4"]
    # adapter A was taught ANSWER_A for exactly the first two prompts
    assert [r["scores"]["exact_match"] for r in rows[:2]] == [1.0, 1.0], rows[:2]
    assert rows[0]["prediction"] == ANSWER_A and rows[0]["reference"] == ANSWER_A
    summary = json.loads((tmp_path / "runs" / "ev" / "eval" / "summary.json").read_text())
    assert summary["examples"] == 4
    assert summary["metrics"]["exact_match"] == pytest.approx(sum(r["scores"]["exact_match"] for r in rows) / 4)
    # lm-eval on the local task: A's answer is the most likely choice for both questions
    assert summary["lm_eval"]["lm_eval/rayft_hello_mc/acc_norm"] == 1.0, summary
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("rayft").experiment_id], "tags.`rayft.kind` = 'eval'")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["exact_match"] == summary["metrics"]["exact_match"] and metrics["eval_examples"] == 4
    assert metrics["lm_eval/rayft_hello_mc/acc_norm"] == 1.0


def test_compare_on_s3_storage(toy_adapters, tiny_model_dir, tmp_path, s3_server):
    bucket = s3_server.create_bucket("evalcompare")
    cfg = _config(tmp_path, tiny_model_dir, bucket + "/runs")
    out = _rayft("eval", str(cfg), "--compare", toy_adapters["a"], toy_adapters["b"], env=s3_server.env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    assert "paired bootstrap" in out.stdout and "examples that changed most" in out.stdout, out.stdout
    from rayft.data import storage

    os.environ.update(s3_server.env)
    comparison = json.loads(storage.read_text(bucket + "/runs/ev/eval/comparison.json"))
    em = next(m for m in comparison["metrics"] if m["metric"] == "exact_match")
    # A answers the first two prompts exactly, B answers them ANSWER_B: B - A is -0.5 on exact match
    assert em["a"] - em["b"] == pytest.approx(0.5) and em["diff"] == pytest.approx(-0.5)
    # four examples: a resample may miss both changed ones, so the interval reaches 0 but never above it
    assert -1.0 <= em["low"] < em["diff"] < em["high"] <= 0.0
    changed = {c["id"] for c in comparison["most_changed"]}
    assert {"golden:1", "golden:2"} <= changed
    first = next(c for c in comparison["most_changed"] if c["id"] == "golden:1")
    assert first["prediction_a"] == ANSWER_A and first["prediction_b"] == ANSWER_B
    assert storage.is_file(bucket + "/runs/ev/eval/compare-a.jsonl")


def test_bad_input_names_the_value_and_the_fix(tiny_model_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir, str(tmp_path / "runs"))
    out = _rayft("eval", str(cfg), "--model", str(tmp_path / "no-such-model"), cwd=tmp_path)
    assert out.returncode == 2 and "no-such-model: no such folder" in out.stderr, out.stderr[-2000:]
    hub_task = tmp_path / "hub_task.yaml"
    hub_task.write_text(yaml.safe_dump({"task": "from_hub", "dataset_path": "cais/mmlu", "output_type": "multiple_choice"}))
    cfg = _config(tmp_path, tiny_model_dir, str(tmp_path / "runs"), lm_eval={"tasks": [str(hub_task)]})
    out = _rayft("eval", str(cfg), "--model", tiny_model_dir, "--set", "eval.max_examples=1", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "hub_task.yaml reads dataset_path 'cais/mmlu'" in out.stderr and "dataset_path: json" in out.stderr
