"""One evaluation: a model answers the golden set, each answer is scored, the results are written and tracked.

    <run>/eval/results.jsonl   one line per example: id, prompt, reference, prediction, scores
    <run>/eval/summary.json    the aggregates (mean of each metric), the model, the golden set, the time taken
    MLflow                     the aggregates as metrics of an `eval` run (and the two files as artifacts)

`<run>` is `<storage_path>/<name>`, a folder or a bucket prefix alike (data/storage.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from rayft.data import storage

from .config import EvalConfig
from .golden import GoldenExample
from .metrics import mean_scores, score, scorers


@dataclass
class EvalResult:
    model: str
    metrics: list[str]
    rows: list[dict]
    aggregates: dict[str, float]
    seconds: float
    extra: dict = field(default_factory=dict)  # lm-eval's figures, `lm_eval/<task>/<metric>`

    @property
    def examples(self) -> int:
        return len(self.rows)

    def summary(self) -> dict:
        return {"model": self.model, "examples": self.examples, "seconds": round(self.seconds, 2),
                "metrics": self.aggregates, **({"lm_eval": self.extra} if self.extra else {})}


def evaluate_examples(model, tokenizer, examples: Sequence[GoldenExample], cfg: EvalConfig, label: str,
                      chat_template: Optional[str] = None, metrics: Optional[list[str]] = None,
                      log: Callable[[str], None] = print) -> EvalResult:
    """Generate an answer to every example (batched, greedy) and score it with the configured metrics."""
    from .generate import generate_answers, prompt_texts

    names = list(metrics or cfg.metrics)
    fns = scorers(names, cfg.resolved_schema() if "json_schema" in names else None)
    t0 = time.perf_counter()
    texts = prompt_texts([e.prompt for e in examples], tokenizer, chat_template,
                         [e.tools for e in examples])
    answers = generate_answers(model, tokenizer, texts, cfg.max_new_tokens, cfg.batch_size,
                               max_prompt_tokens=_prompt_budget(model, cfg.max_new_tokens))
    rows = [{"id": e.id, "prompt": e.prompt, "reference": e.reference, "prediction": a,
             "scores": score(a, e.reference, fns)} for e, a in zip(examples, answers)]
    seconds = time.perf_counter() - t0
    result = EvalResult(label, names, rows, mean_scores([r["scores"] for r in rows], names), seconds)
    log(f"{label}: {len(rows)} example(s) in {seconds:.1f}s; " + format_aggregates(result.aggregates))
    return result


def _prompt_budget(model, max_new_tokens: int) -> Optional[int]:
    """Prompt tokens that leave room for the answer within the model's context."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return max(1, limit - max_new_tokens) if limit else None


def format_aggregates(aggregates: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in aggregates.items())


def write_results(result: EvalResult, out_dir: str, name: str = "results") -> str:
    """`<out_dir>/results.jsonl` (one line per example) and `<out_dir>/summary.json`; another `name` gives
    `<name>.jsonl` and `<name>-summary.json`. A folder or a bucket prefix alike. Returns the results path."""
    storage.make_dirs(out_dir)
    path = storage.join(out_dir, f"{name}.jsonl")
    storage.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows))
    summary = "summary.json" if name == "results" else f"{name}-summary.json"
    storage.write_text(storage.join(out_dir, summary), json.dumps(result.summary(), indent=2))
    return path


def read_results(path: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def log_to_mlflow(uri: str, experiment: str, run_name: str, storage_root: str, results: Sequence[EvalResult],
                  out_dir: str, params: Optional[dict] = None) -> str:
    """An MLflow run holding each result's aggregates (prefixed by its label when there are several) and the
    output folder as artifacts. Returns the run id."""
    import os
    import tempfile

    from rayft.registry.tracking import client, log_metrics, open_run

    run_id = open_run(uri, experiment, run_name, storage_root, params or {}, {"rayft.kind": "eval"})
    c = client(uri)
    for r in results:
        prefix = "" if len(results) == 1 else f"{r.model}/"
        figures = {**r.aggregates, **r.extra, "eval_examples": r.examples, "eval_seconds": r.seconds}
        log_metrics(uri, run_id, {_mlflow_key(prefix + k): v for k, v in figures.items()}, 0)
    with tempfile.TemporaryDirectory(prefix="rayft-eval-") as local:
        c.log_artifacts(run_id, storage.download_dir(out_dir, os.path.join(local, "eval")), artifact_path="eval")
    c.set_terminated(run_id, status="FINISHED")
    return run_id


def _mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits, `_-./ ` and spaces only."""
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in key)


def evaluate_source(source: str, base, examples: Sequence[GoldenExample], cfg: EvalConfig, opener,
                    tracking_uri: Optional[str] = None, chat_template: Optional[str] = None,
                    label: Optional[str] = None, metrics: Optional[list[str]] = None, lm_eval: bool = True,
                    log: Callable[[str], None] = print) -> EvalResult:
    """Load the model `source` names (sources.load_model) and evaluate it; with `lm_eval` and `cfg.lm_eval`, run
    the lm-eval tasks on it as well."""
    import gc

    from .sources import load_model

    loaded = load_model(source, base, opener, tracking_uri)
    shown = label or source + (f" ({loaded.concrete})" if loaded.concrete != source else "")
    result = evaluate_examples(loaded.model, loaded.tokenizer, examples, cfg, shown, chat_template, metrics, log)
    if lm_eval and cfg.lm_eval is not None:
        from .harness import run_tasks

        result.extra = run_tasks(loaded.model, loaded.tokenizer, cfg.lm_eval)
        log(f"{shown}: lm-eval " + format_aggregates(result.extra))
    del loaded
    gc.collect()
    return result
