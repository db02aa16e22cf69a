"""The `tracking:` section (MLflow) and the promotion policy (`tune.promotion`, `rayft run --promote`)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


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

    policy: Literal["better_eval_loss", "always", "never"] = Field(
        default="better_eval_loss",
        description="`better_eval_loss`: the challenger becomes champion when its eval loss on the same eval set "
        "beats the champion's by more than `min_improvement` (or when there is no champion); `always`; `never` "
        "(alias `challenger` only).",
    )
    min_improvement: float = Field(default=0.0, ge=0.0, description="Required eval-loss margin.")
