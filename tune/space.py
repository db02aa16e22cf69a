"""From our search space to Ray Tune's, and from a trial's values back to a train config."""
from __future__ import annotations

import copy
import math
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from rayft.train.config import TrainConfig

from .config import Choice, Grid, LogUniform, RandInt, Times, TuneConfig, Uniform, canonical_key


class SearchSpaceError(ValueError):
    pass


def numeric_fields(model: type[BaseModel] = TrainConfig, prefix: str = "train") -> dict[str, type]:
    """Every int/float field under the train section, by dotted path."""
    out: dict[str, type] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        path = f"{prefix}.{name}"
        sub = _model_of(ann)
        if sub is not None:
            out.update(numeric_fields(sub, path))
            continue
        kinds = {a for a in (typing.get_args(ann) or (ann,)) if a in (int, float)}
        if kinds and bool not in (typing.get_args(ann) or (ann,)) and ann is not bool:
            out[path] = float if float in kinds else int
    return out


def _model_of(ann: Any):
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def validate_space(tune_cfg: TuneConfig, train_cfg: TrainConfig) -> dict[str, type]:
    """Every key names a numeric train field, and every value a domain can give passes that field's checks."""
    fields = numeric_fields()
    kinds: dict[str, type] = {}
    for raw_key, domain in tune_cfg.search_space.items():
        key = canonical_key(raw_key)
        if key not in fields:
            close = [f for f in fields if f.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SearchSpaceError(
                f"tune.search_space.{raw_key}: {key!r} is not a numeric field of the train section{hint}. "
                f"Searchable fields: {', '.join(sorted(fields))}"
            )
        kinds[key] = fields[key]
        for value in _probe_values(domain):
            try:
                apply_params(train_cfg, {key: fields[key](value) if fields[key] is int else value})
            except ValidationError as e:
                msg = e.errors()[0]["msg"]
                raise SearchSpaceError(
                    f"tune.search_space.{raw_key}: the value {value!r} is not valid for {key}: {msg}"
                ) from None
        if fields[key] is int and isinstance(domain, (Uniform, LogUniform)):
            raise SearchSpaceError(
                f"tune.search_space.{raw_key}: {key} is an integer; use `choice`, `grid` or `randint`, not a "
                f"continuous distribution"
            )
    return kinds


def _probe_values(domain) -> list:
    if isinstance(domain, Choice):
        return list(domain.choice)
    if isinstance(domain, Grid):
        return list(domain.grid)
    if isinstance(domain, Uniform):
        return list(domain.uniform)
    if isinstance(domain, LogUniform):
        return list(domain.loguniform)
    if isinstance(domain, RandInt):
        return list(domain.randint)
    return []  # Times: checked through the field it refers to, at trial time


def to_tune_space(tune_cfg: TuneConfig) -> dict:
    """Ray Tune `param_space` (flat, keyed by dotted path)."""
    from ray import tune

    space: dict[str, Any] = {}
    for raw_key, d in tune_cfg.search_space.items():
        key = canonical_key(raw_key)
        if isinstance(d, Choice):
            space[key] = tune.choice(list(d.choice))
        elif isinstance(d, Grid):
            space[key] = tune.grid_search(list(d.grid))
        elif isinstance(d, Uniform):
            space[key] = tune.uniform(*d.uniform)
        elif isinstance(d, LogUniform):
            space[key] = tune.loguniform(*d.loguniform)
        elif isinstance(d, RandInt):
            space[key] = tune.randint(d.randint[0], d.randint[1] + 1)
    for raw_key, d in tune_cfg.search_space.items():
        if isinstance(d, Times):
            ref, factor = canonical_key(d.times), d.factor
            space[canonical_key(raw_key)] = tune.sample_from(lambda spec, ref=ref, factor=factor: factor * spec.config[ref])
    return space


def trial_count(tune_cfg: TuneConfig) -> int:
    """Trials a search runs: num_samples times the product of the grid sizes (Ray Tune's grid_search semantics)."""
    n = tune_cfg.num_samples
    for d in tune_cfg.search_space.values():
        if isinstance(d, Grid):
            n *= len(d.grid)
    return n


# The fields that decide what one trial holds of the cluster (tune/search.py check_fits).
RESOURCE_FIELDS = ("train.num_workers", "train.cpus_per_worker")


def largest_value(domain, space: dict) -> float:
    """The largest value a domain can give (a `times:` rule: its factor times the largest of the field it names)."""
    if not isinstance(domain, Times):
        return max(_probe_values(domain))
    ref = next(d for k, d in space.items() if canonical_key(k) == canonical_key(domain.times))
    return domain.factor * largest_value(ref, space)


def largest_trial(train_cfg: TrainConfig, tune_cfg: TuneConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """The train section of the most demanding trial the space can produce (the largest searched `num_workers` and
    `cpus_per_worker`), and those searched values by field."""
    params: dict[str, Any] = {}
    for raw_key, domain in tune_cfg.search_space.items():
        key = canonical_key(raw_key)
        if key in RESOURCE_FIELDS:
            value = largest_value(domain, tune_cfg.search_space)
            params[key] = math.ceil(value) if key == "train.num_workers" else value
    return (apply_params(train_cfg, params) if params else train_cfg), params


def apply_params(train_cfg: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """A copy of the train section with the trial's values set (validated like a config file)."""
    raw = train_cfg.model_dump(mode="json")
    for key, value in params.items():
        parts = canonical_key(key).split(".")[1:]
        node = raw
        for p in parts[:-1]:
            node = node[p]
        if isinstance(value, float) and math.isfinite(value) and isinstance(node.get(parts[-1]), int) and value.is_integer():
            value = int(value)
        node[parts[-1]] = value
    return TrainConfig.model_validate(copy.deepcopy(raw))
