"""Two models on the same golden set: per metric the difference (B - A) with a paired bootstrap confidence
interval, and the examples whose scores changed most.

The bootstrap is paired: each resample draws examples (with replacement) and takes the mean of B's score minus A's
on the same examples, so the interval reflects how much the difference depends on which examples were drawn.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .config import EvalError
from .run import EvalResult


@dataclass
class MetricDelta:
    metric: str
    a: float
    b: float
    diff: float  # b - a
    low: float
    high: float
    confidence: float


@dataclass
class Comparison:
    a: str
    b: str
    examples: int
    deltas: list[MetricDelta]
    changed: list[dict] = field(default_factory=list)  # id, reference, prediction_a/b, scores_a/b, change

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "examples": self.examples,
                "metrics": [d.__dict__ for d in self.deltas], "most_changed": self.changed}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], samples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """(mean of b - a, low, high): the percentile interval of the mean difference over `samples` resamples."""
    import numpy as np

    if len(a) != len(b) or not len(a):
        raise EvalError(f"a paired bootstrap needs two score lists of the same non-zero length, got {len(a)} and {len(b)}")
    if not 0 < confidence < 1:
        raise EvalError(f"confidence {confidence}: must be between 0 and 1 (for example 0.95)")
    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(samples, len(diffs)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(diffs.mean()), float(low), float(high)


def compare(a: EvalResult, b: EvalResult, samples: int = 1000, confidence: float = 0.95, seed: int = 0,
            top: int = 5) -> Comparison:
    ids_a, ids_b = [r["id"] for r in a.rows], [r["id"] for r in b.rows]
    if ids_a != ids_b:
        raise EvalError(f"{a.model} and {b.model} were not evaluated on the same golden set examples; evaluate both "
                        f"with the same config (eval.sources, eval.max_examples, eval.seed)")
    metrics = [m for m in a.metrics if m in b.metrics]
    deltas = []
    for m in metrics:
        sa, sb = [r["scores"][m] for r in a.rows], [r["scores"][m] for r in b.rows]
        diff, low, high = paired_bootstrap(sa, sb, samples, confidence, seed)
        deltas.append(MetricDelta(m, a.aggregates[m], b.aggregates[m], diff, low, high, confidence))
    changes = []
    for ra, rb in zip(a.rows, b.rows):
        change = sum(rb["scores"][m] - ra["scores"][m] for m in metrics) / max(len(metrics), 1)
        changes.append({"id": ra["id"], "change": change, "reference": ra["reference"],
                        "prediction_a": ra["prediction"], "prediction_b": rb["prediction"],
                        "scores_a": ra["scores"], "scores_b": rb["scores"]})
    changes.sort(key=lambda c: (-abs(c["change"]), c["id"]))
    return Comparison(a.model, b.model, len(a.rows), deltas, [c for c in changes[:top] if c["change"] != 0])


def format_comparison(c: Comparison) -> str:
    conf = f"{100 * c.deltas[0].confidence:g}%" if c.deltas else ""
    head = ["metric", "A", "B", "B - A", f"{conf} interval"]
    rows = [[d.metric, f"{d.a:.4f}", f"{d.b:.4f}", f"{d.diff:+.4f}", f"[{d.low:+.4f}, {d.high:+.4f}]"]
            for d in c.deltas]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths))  # noqa: E731
    out = [f"A: {c.a}", f"B: {c.b}", f"{c.examples} golden example(s), paired bootstrap", "",
           line(head), line(["-" * w for w in widths]), *(line(r) for r in rows), ""]
    if not c.changed:
        out.append("no example changed its scores")
    else:
        out.append("examples that changed most (mean change over the metrics, B - A):")
        for ch in c.changed:
            out.append(f"  {ch['id']}  {ch['change']:+.3f}")
            out.append(f"    reference: {_clip(ch['reference'])}")
            out.append(f"    A: {_clip(ch['prediction_a'])}")
            out.append(f"    B: {_clip(ch['prediction_b'])}")
    return "\n".join(out)


def _clip(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
