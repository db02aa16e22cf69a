"""The `tune:` section: which training fields to search, how, and when a result becomes champion.

A search space maps a dotted field of the config (`train.learning_rate`, `train.lora.rank`; the
short form `lora.rank` means `train.lora.rank`) to a distribution:

    search_space:
      train.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}
      lora.rank: {choice: [4, 8, 16]}
      lora.alpha: {times: lora.rank, factor: 2}     # a rule: alpha = 2 x rank
      lora.dropout: {uniform: [0.0, 0.1]}
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rayft.registry.config import PromotionPolicy


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class Choice(_Section):
    choice: list[Union[int, float]] = Field(min_length=1, description="Pick one of these values.")


class Grid(_Section):
    grid: list[Union[int, float]] = Field(min_length=1, description="Every value, once per sample (grid search).")


class Uniform(_Section):
    uniform: tuple[float, float] = Field(description="[low, high], uniform.")


class LogUniform(_Section):
    loguniform: tuple[float, float] = Field(description="[low, high], uniform in log space (both > 0).")

    @field_validator("loguniform")
    @classmethod
    def _positive(cls, v):
        if v[0] <= 0 or v[1] <= 0:
            raise ValueError(f"loguniform bounds must be > 0, got {list(v)}")
        return v


class RandInt(_Section):
    randint: tuple[int, int] = Field(description="[low, high] integers, high inclusive.")


class Times(_Section):
    times: str = Field(description="Another searched field (`lora.rank`); this field = factor x its value.")
    factor: float = Field(default=2.0, gt=0, description="The multiplier.")


Domain = Union[Choice, Grid, Uniform, LogUniform, RandInt, Times]


class AshaSettings(_Section):
    """ASHA: successive halving on eval loss, fed by the evaluations training already reports."""

    enabled: bool = Field(default=True, description="Stop weak trials early; off: every trial runs to the end.")
    grace_period_steps: int = Field(default=10, ge=1, description="Optimizer steps before a trial can be stopped.")
    reduction_factor: float = Field(default=2.0, gt=1, description="Keep the best 1/reduction_factor at each rung.")
    max_steps: Optional[int] = Field(
        default=None, ge=1, description="Steps of a full trial; unset: the train section's plan (max_steps or epochs)."
    )



class TuneConfig(_Section):
    """Hyperparameter search with Ray Tune over the training loop."""

    search_space: dict[str, Domain] = Field(min_length=1, description="Dotted field -> distribution (see above).")
    num_samples: int = Field(default=4, ge=1, description="Trials (with `grid` domains: repeats of the whole grid).")
    algorithm: Literal["random", "optuna"] = Field(
        default="random", description="`random` (grid domains enumerate) or Optuna TPE (needs `pip install optuna`)."
    )
    metric: str = Field(
        default="eval_loss",
        description="What ASHA and the choice of the best trial rank by: `eval_loss`, or a task metric of the eval "
        "section (exact_match, token_f1, rouge_l, json_valid, json_schema, tool_name_match, tool_args_match), computed at every evaluation step on "
        "`eval.search_sample` examples of the golden set.")
    mode: Optional[Literal["min", "max"]] = Field(
        default=None, description="Whether lower or higher `metric` is better; unset: min for eval_loss, max for a "
        "task metric.")
    asha: AshaSettings = Field(default_factory=AshaSettings, description="Early stopping of trials.")
    max_concurrent_trials: Optional[int] = Field(
        default=None, ge=1, description="Trials at once; unset: as many as the cluster's CPUs/GPUs fit."
    )
    seed: int = Field(default=0, description="Seed of the search algorithm.")
    promotion: PromotionPolicy = Field(default_factory=PromotionPolicy, description="Champion policy.")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        from rayft.eval.config import METRIC_NAMES

        if v not in ("eval_loss", *METRIC_NAMES):
            raise ValueError(f"unknown metric; use eval_loss or a task metric: {', '.join(METRIC_NAMES)}")
        return v

    @property
    def metric_mode(self) -> str:
        return self.mode or ("min" if self.metric == "eval_loss" else "max")

    @property
    def is_task_metric(self) -> bool:
        return self.metric != "eval_loss"

    @model_validator(mode="after")
    def _optuna_takes_distributions_only(self):
        # Ray's OptunaSearch converts each domain to an Optuna distribution: it refuses `sample_from` (what a
        # `times:` rule becomes) and grid_search, so such a search would fail only after the data is prepared.
        if self.algorithm != "optuna":
            return self
        for k, d in self.search_space.items():
            if isinstance(d, Times):
                raise ValueError(
                    f"search_space.{k}: a `times: {d.times}` rule cannot be searched with algorithm: optuna (Optuna "
                    f"samples each field from its own distribution); give {k} its own distribution, or use "
                    f"algorithm: random"
                )
            if isinstance(d, Grid):
                raise ValueError(
                    f"search_space.{k}: `grid: {d.grid}` cannot be searched with algorithm: optuna (Optuna samples, "
                    f"it does not enumerate a grid); write `choice: {d.grid}`, or use algorithm: random"
                )
        return self

    @model_validator(mode="after")
    def _times_refers_to_searched(self):
        keys = {canonical_key(k) for k in self.search_space}
        for k, d in self.search_space.items():
            if isinstance(d, Times) and canonical_key(d.times) not in keys:
                raise ValueError(
                    f"search_space.{k}: `times: {d.times}` refers to a field that is not searched; add "
                    f"{d.times} to search_space or use a fixed value in the train section"
                )
        return self


def canonical_key(key: str) -> str:
    """`lora.rank` -> `train.lora.rank`; `train.x` stays."""
    key = key.strip()
    return key if key.startswith("train.") else "train." + key


def describe(domain: Any) -> str:
    return domain.model_dump_json() if isinstance(domain, BaseModel) else repr(domain)
