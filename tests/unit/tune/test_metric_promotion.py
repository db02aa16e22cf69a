"""The search metric's config and the better_metric decision (no Ray, no model)."""
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from rayft.registry.config import TASK_METRICS, PromotionPolicy
from rayft.registry.promotion import decide_by_metric
from rayft.tune.config import TuneConfig

SPACE = {"train.learning_rate": {"grid": [1e-3]}}


def test_registry_and_eval_name_the_same_task_metrics():
    from rayft.eval.config import METRIC_NAMES

    assert tuple(TASK_METRICS) == tuple(METRIC_NAMES)


def test_tune_metric_and_its_mode():
    assert TuneConfig(search_space=SPACE).metric_mode == "min"
    assert TuneConfig(search_space=SPACE, metric="token_f1").metric_mode == "max"
    assert TuneConfig(search_space=SPACE, metric="rouge_l", mode="min").metric_mode == "min"
    with pytest.raises(ValidationError, match="unknown metric; use eval_loss or a task metric: exact_match, token_f1"):
        TuneConfig(search_space=SPACE, metric="accuracy")


def test_better_metric_needs_a_metric():
    with pytest.raises(ValidationError, match="policy better_metric needs `metric`"):
        PromotionPolicy(policy="better_metric")
    with pytest.raises(ValidationError, match="less than 1"):
        PromotionPolicy(policy="better_metric", metric="token_f1", confidence=1.5)


def test_the_gain_must_clear_the_margin_at_the_confidence_level():
    champion = SimpleNamespace(version="3")
    first = decide_by_metric("token_f1", 0.02, 0.95, 0.4)
    assert first.promote and "no champion yet" in first.why and first.tags()["rayft.promotion.decision"] == "promoted"
    clear = decide_by_metric("token_f1", 0.02, 0.95, 0.6, champion, 0.4, (0.2, 0.1, 0.3), 50)
    assert clear.promote and "beats champion v3's 0.4000" in clear.why
    inside = decide_by_metric("token_f1", 0.02, 0.95, 0.45, champion, 0.4, (0.05, 0.01, 0.09), 50)
    assert not inside.promote and "not above 0.02 with 95% confidence" in inside.why
    tags = inside.tags()
    assert tags["rayft.promotion.decision"] == "refused" and tags["rayft.promotion.champion_version"] == "3"
    assert tags["rayft.promotion.ci_low"] == "0.01" and tags["rayft.promotion.challenger_score"] == "0.45"
