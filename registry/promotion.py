"""The promotion policy: does a challenger version replace the champion?

`better_eval_loss` compares eval losses only when both versions were measured on the same eval set
(same dataset fingerprint); otherwise the challenger stays a challenger and the reason says why.

`better_metric` compares a task metric of both versions on the same golden set, answered now by both (the
evaluation itself is the caller's: tune/champion.py). The challenger is promoted only when the lower end of the
confidence interval of its gain (paired bootstrap) exceeds `min_improvement`. The decision, both scores and the
interval go to the challenger version's tags (`rayft.promotion.*`) and to the audit log.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

CHALLENGER, CHAMPION = "challenger", "champion"


def current_version(uri: str, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    from .tracking import client

    try:
        return client(uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def decide(policy: str, min_improvement: float, challenger_loss: Optional[float], challenger_fp: Optional[str],
           champion) -> tuple[bool, str]:
    """(promote?, why) for a challenger against the current champion version (or None)."""
    if policy == "never":
        return False, "policy `never`: the new version stays `challenger`"
    if policy == "always":
        return True, "policy `always`"
    if champion is None:
        return True, "there is no champion yet"
    tags = dict(champion.tags or {})
    if challenger_fp is None or tags.get("dataset_fingerprint") != challenger_fp:
        return False, (f"champion v{champion.version} was measured on another eval set (fingerprint "
                       f"{tags.get('dataset_fingerprint')} vs {challenger_fp}); eval losses are not comparable, so "
                       f"the new version stays `challenger` (promote it by hand after checking)")
    try:
        champion_loss = float(tags["eval_loss"])
    except (KeyError, ValueError):
        return True, f"champion v{champion.version} has no eval loss recorded"
    if challenger_loss is not None and challenger_loss < champion_loss - min_improvement:
        return True, f"eval loss {challenger_loss:.4f} beats champion v{champion.version}'s {champion_loss:.4f}"
    return False, (f"eval loss {challenger_loss:.4f} does not beat champion v{champion.version}'s "
                   f"{champion_loss:.4f} by more than {min_improvement}")


@dataclass
class MetricVerdict:
    """A better_metric decision and the figures behind it."""

    promote: bool
    why: str
    metric: str
    challenger_score: float
    champion_score: Optional[float] = None  # None: there is no champion
    champion_version: Optional[str] = None
    diff: Optional[float] = None  # challenger - champion
    low: Optional[float] = None
    high: Optional[float] = None
    confidence: float = 0.95
    min_improvement: float = 0.0
    examples: int = 0

    def tags(self) -> dict[str, str]:
        figures = {"decision": "promoted" if self.promote else "refused", "policy": "better_metric",
                   "metric": self.metric, "challenger_score": self.challenger_score,
                   "champion_score": self.champion_score, "champion_version": self.champion_version,
                   "diff": self.diff, "ci_low": self.low, "ci_high": self.high, "confidence": self.confidence,
                   "min_improvement": self.min_improvement, "golden_examples": self.examples, "reason": self.why}
        return {f"rayft.promotion.{k}": (f"{v:.6g}" if isinstance(v, float) else str(v))[:5000]
                for k, v in figures.items() if v is not None}


def decide_by_metric(metric: str, min_improvement: float, confidence: float, challenger_score: float,
                     champion=None, champion_score: Optional[float] = None,
                     interval: Optional[tuple[float, float, float]] = None, examples: int = 0) -> MetricVerdict:
    """The verdict for a challenger scored `challenger_score` against `champion` (a version, or None) scored
    `champion_score`, with `interval` = (mean gain, low, high) of challenger - champion at `confidence`."""
    base = dict(metric=metric, challenger_score=challenger_score, confidence=confidence,
                min_improvement=min_improvement, examples=examples)
    if champion is None:
        return MetricVerdict(True, f"there is no champion yet ({metric} {challenger_score:.4f})", **base)
    diff, low, high = interval
    facts = dict(base, champion_score=champion_score, champion_version=str(champion.version), diff=diff, low=low,
                 high=high)
    pct = f"{100 * confidence:g}%"
    span = f"gain {diff:+.4f}, {pct} interval [{low:+.4f}, {high:+.4f}] on {examples} golden example(s)"
    if low > min_improvement:
        return MetricVerdict(True, f"{metric} {challenger_score:.4f} beats champion v{champion.version}'s "
                                   f"{champion_score:.4f} by more than {min_improvement} ({span})", **facts)
    return MetricVerdict(False, f"{metric} {challenger_score:.4f} vs champion v{champion.version}'s "
                                f"{champion_score:.4f}: the gain is not above {min_improvement} with {pct} confidence "
                                f"({span}); the new version stays `challenger`", **facts)


def record_verdict(uri: str, name: str, version: str, verdict: MetricVerdict, audit_log: Optional[str]) -> None:
    """The verdict on the challenger version's tags and, when there is an audit log, one audit line."""
    from .tracking import client

    c = client(uri)
    for k, v in verdict.tags().items():
        c.set_model_version_tag(name, version, k, v)
    if audit_log:
        from rayft.security.access import AuditLog, Decision, current_user

        log = AuditLog(audit_log)
        try:
            log.record(Decision(verdict.promote, current_user(), "user", None, "promote",
                                f"models:/{name}/{version}@{CHAMPION}", verdict.why, "promotion.policy better_metric"),
                       source="promotion")
        finally:
            log.close()
