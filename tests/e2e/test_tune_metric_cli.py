"""A search ranked by a task metric, and the better_metric promotion gate, as a user runs them (`rayft tune`).

The data teaches one fixed answer to varied help-desk questions, so a trial that learns reaches token F1 1.0 on
the golden sample at its first evaluation while a frozen one (learning rate 1e-7) stays near 0: ASHA, ranking by
token_f1, stops the frozen trial at the first rung. The best trial's search figure reaches the registry version's
tags, and the gate (both versions answer the same golden set) promotes the first version (no champion yet) and
refuses a second, identical one: its gain is inside the margin. Both decisions are in the tags and the audit log.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RAYFT = str(Path(sys.executable).with_name("rayft"))
ANSWER = "Please open a ticket at the help desk and we will reply within one day."
SUBJECTS = ["the invoice", "my password", "the office", "a refund", "the VPN", "my laptop", "the printer",
            "a parking spot", "the holiday calendar", "my payslip", "the badge", "the wifi"]
VERBS = ["Where can I find", "How do I get", "Who handles", "When can I ask about", "What should I do about"]


def _config(tmp: Path, tiny_model_dir: str) -> Path:
    data = tmp / "helpdesk.jsonl"
    data.write_text("".join(json.dumps({"question": f"{v} {s}?", "answer": ANSWER}) + "\n"
                            for v in VERBS for s in SUBJECTS))
    cfg = {
        "name": "tm1", "storage_path": str(tmp / "runs"), "model": {"name_or_path": tiny_model_dir},
        "data": {"sources": [{"path": str(data), "schema": "qa"}], "max_seq_length": 128, "eval_fraction": 0.2},
        "ray": {"num_cpus": 2},
        "train": {"num_workers": 1, "cpus_per_worker": 1, "micro_batch_size": 4, "max_steps": 40, "warmup_steps": 0,
                  "lr_schedule": "constant", "eval_every_n_steps": 10, "save_every_n_steps": 10,
                  "logging_every_n_steps": 10, "lora": {"rank": 4, "alpha": 8}},
        "tracking": {"register_model": "helpdesk"},
        "security": {"audit_log": str(tmp / "audit.jsonl")},
        "eval": {"metrics": ["token_f1"], "search_sample": 8, "search_max_new_tokens": 24, "max_new_tokens": 24},
        "tune": {"num_samples": 1, "search_space": {"learning_rate": {"grid": [1.0e-2, 1.0e-7]}},
                 "metric": "token_f1", "max_concurrent_trials": 1,
                 "asha": {"grace_period_steps": 10, "reduction_factor": 2},
                 "promotion": {"policy": "better_metric", "metric": "token_f1", "min_improvement": 0.01}},
    }
    path = tmp / "tm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _trial_results(search_dir: Path) -> dict[float, list[dict]]:
    """learning rate -> the trial's reported results with an evaluation, in order."""
    out = {}
    for f in search_dir.glob("_trial_driver_*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        evals = [r for r in rows if "eval_loss" in r]
        out[rows[0]["config"]["train.learning_rate"]] = evals
    return out


@pytest.fixture(scope="module")
def searches(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune-metric")
    cfg = _config(tmp, tiny_model_dir)
    outs = []
    for args in ([], ["--set", "name=tm2", "--set", "tune.search_space.learning_rate.grid=[0.01]"]):
        p = subprocess.run([RAYFT, "tune", str(cfg), *args], capture_output=True, text=True, timeout=800, cwd=tmp)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        outs.append(p.stdout)
    return tmp, outs


def test_asha_stops_on_the_task_metric(searches):
    tmp, (first, _) = searches
    trials = _trial_results(tmp / "runs" / "tm1-search")
    good, frozen = trials[1.0e-2], trials[1.0e-7]
    assert [r["global_step"] for r in good] == [10, 20, 30, 40]
    assert [r["global_step"] for r in frozen] == [10], "ASHA stops the frozen trial at its first rung"
    assert good[0]["token_f1"] == 1.0 and frozen[0]["token_f1"] < 0.1, (good[0], frozen[0])
    assert "ranked by token_f1 (max)" in first and "search metric: token_f1 on 8 example(s)" in first, first[-3000:]


def test_metric_reaches_the_champion_and_the_gate_refuses_inside_the_margin(searches):
    tmp, (first, second) = searches
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}", registry_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    v1, v2 = (dict(c.get_model_version("helpdesk", v).tags) for v in ("1", "2"))
    assert str(c.get_model_version_by_alias("helpdesk", "champion").version) == "1"
    assert str(c.get_model_version_by_alias("helpdesk", "challenger").version) == "2"
    # the search figure (ASHA's metric on the search sample) and the gate's figures on the whole golden set
    assert v1["rayft.search_metric"] == "token_f1" and float(v1["search_token_f1"]) == 1.0
    assert v1["rayft.promotion.decision"] == "promoted" and "no champion yet" in v1["rayft.promotion.reason"]
    assert v2["rayft.promotion.decision"] == "refused" and v2["rayft.promotion.champion_version"] == "1"
    assert float(v2["rayft.promotion.challenger_score"]) == float(v2["rayft.promotion.champion_score"]) == 1.0
    assert float(v2["rayft.promotion.ci_low"]) <= 0.01 and v2["rayft.promotion.confidence"] == "0.95"
    assert "not above 0.01 with 95% confidence" in second, second[-3000:]
    # the golden set is the eval split the data pipeline made (same rows)
    report = json.loads(next((tmp / "runs" / "tm1-search" / "trials").glob("trial-*/data_report.json")).read_text())
    assert f"golden set: {report['totals']['eval_examples']} example(s) from the eval split" in first
    audit = [json.loads(line) for line in (tmp / "audit.jsonl").read_text().splitlines()]
    gate = [a for a in audit if a["source"] == "promotion"]
    assert [(a["outcome"], a["target"]) for a in gate] == [("allowed", "models:/helpdesk/1@champion"),
                                                            ("denied", "models:/helpdesk/2@champion")]
    parent = c.search_runs([c.get_experiment_by_name("rayft").experiment_id], "tags.`rayft.kind` = 'search'")
    assert {r.data.metrics.get("best_token_f1") for r in parent} == {1.0}
    assert os.path.isdir(tmp / "runs" / "tm1-search" / "export" / "merged")
