"""The `tracking:` section (MLflow) and the promotion policy (`tune.promotion`, `rayft run --promote`)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The eval section's task metrics (eval/config.py; a test holds the two lists equal: registry does not import eval).
TaskMetric = Literal["exact_match", "token_f1", "rouge_l", "json_valid", "json_schema", "tool_name_match",
                     "tool_args_match"]
TASK_METRICS = ("exact_match", "token_f1", "rouge_l", "json_valid", "json_schema", "tool_name_match", "tool_args_match")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class TrackingConfig(_Section):
    """MLflow tracking and model registry."""

    enabled: bool = Field(default=True, description="Log params, metrics and artifacts to MLflow.")
    tracking_uri: Optional[str] = Field(
        default=None,
        description="MLflow server or store URI. Unset: `sqlite:///<storage_path>/mlflow.db` with artifacts in "
        "`<storage_path>/mlartifacts` (a server URI is needed when workers run on other machines).",
    )
    experiment: str = Field(default="rayft", description="MLflow experiment name.")
    register_model: Optional[str] = Field(
        default=None,
        description="Registered model name for the trained adapter; unset: the run name. Empty string: do not register.",
    )


class PromotionPolicy(_Section):
    """When the search's best adapter replaces the registered champion."""

    policy: Literal["better_eval_loss", "better_metric", "always", "never"] = Field(
        default="better_eval_loss",
        description="`better_eval_loss`: the challenger becomes champion when its eval loss on the same eval set "
        "beats the champion's by more than `min_improvement` (or when there is no champion); `better_metric`: both "
        "answer the same golden set (eval section) and the challenger becomes champion only when the lower end of "
        "the `confidence` interval of its gain in `metric` (paired bootstrap) exceeds `min_improvement`; `always`; "
        "`never` (alias `challenger` only).",
    )
    metric: Optional[TaskMetric] = Field(
        default=None, description="With better_metric: the task metric compared (higher is better).")
    min_improvement: float = Field(
        default=0.0, ge=0.0, description="Required margin: of eval loss, or with better_metric of `metric`.")
    confidence: float = Field(
        default=0.95, gt=0.0, lt=1.0, description="With better_metric: level of the paired bootstrap interval.")

    @model_validator(mode="after")
    def _metric_for_better_metric(self):
        if self.policy == "better_metric" and self.metric is None:
            raise ValueError("policy better_metric needs `metric`: the task metric the challenger must improve, one "
                             f"of {', '.join(TASK_METRICS)} (for example metric: token_f1)")
        return self
