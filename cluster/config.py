"""The whole rayft config: one YAML file per run, composed of each package's section.

`load_config(path, overrides)` is the only way a config is read. Errors name the file, the dotted field
path, the bad value and what is allowed.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayft.data.config import DataConfig
from rayft.data.storage import StorageConfig
from rayft.eval.config import EvalConfig
from rayft.models.config import ModelConfig
from rayft.registry.config import TrackingConfig
from rayft.security.config import SecurityConfig
from rayft.serve.config import ServeConfig
from rayft.train.config import TrainConfig
from rayft.tune.config import TuneConfig


class RayConfig(BaseModel):
    """Where the work runs."""

    model_config = ConfigDict(extra="forbid")

    address: Optional[str] = Field(
        default=None,
        description="Ray cluster to join (`ray://host:10001`, `auto`). Unset: `RAY_ADDRESS` if set, otherwise a "
        "local Ray is started in-process.",
    )
    num_cpus: Optional[int] = Field(default=None, ge=1, description="CPUs for a local Ray; unset: all of them.")


class RayftConfig(BaseModel):
    """One run: where it is stored, the base model, the data, and (later sections) training, search, serving."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(description="Run name: the folder under `storage_path` and the MLflow run/model name.")
    storage_path: str = Field(
        default="./runs", description="Local folder or `s3://`/`gs://` URI that holds every run's outputs."
    )
    model: ModelConfig
    data: DataConfig
    ray: RayConfig = Field(default_factory=RayConfig)
    train: TrainConfig = Field(default_factory=TrainConfig, description="Distributed LoRA training (train/config.py).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking and registry.")
    eval: EvalConfig = Field(
        default_factory=EvalConfig, description="Task metrics on a golden set: `rayft eval`, a search's task metric, "
        "the `better_metric` promotion policy (eval/config.py).")
    tune: Optional[TuneConfig] = Field(
        default=None, description="Hyperparameter search (tune/config.py); unset: `rayft tune` refuses the config."
    )
    serve: ServeConfig = Field(
        default_factory=ServeConfig, description="OpenAI-compatible serving on Ray Serve (serve/config.py)."
    )
    security: SecurityConfig = Field(
        default_factory=SecurityConfig,
        description="Artifacts at rest (manifest, AES-256-GCM encryption), safetensors-only loading, the access "
        "policy and the audit log (security/).",
    )
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="Object storage endpoint for s3:// sources, storage_path, MLflow "
        "artifacts and exports (data/storage.py); credentials come from each node's environment, never the config.")

    @model_validator(mode="after")
    def _search_space_fits_train(self) -> "RayftConfig":
        if self.tune is not None:
            from rayft.tune.space import SearchSpaceError, validate_space

            try:
                validate_space(self.tune, self.train)
            except SearchSpaceError as e:
                raise ValueError(str(e)) from None
        return self

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError(
                "must be 1-100 characters of letters, digits, '.', '_' or '-', starting with a letter or digit "
                "(it names a folder and an MLflow model)"
            )
        return v

    @model_validator(mode="after")
    def _qlora_is_not_partitioned(self) -> "RayftConfig":
        from rayft.train.model import qlora_zero3_conflict

        conflict = qlora_zero3_conflict(self.model, self.train)
        if conflict:
            raise ValueError(conflict)
        return self

    @model_validator(mode="after")
    def _remote_storage_needs_a_tracking_server(self) -> "RayftConfig":
        remote = "://" in self.storage_path and not self.storage_path.startswith("file://")
        if remote and self.tracking.enabled and not self.tracking.tracking_uri:
            raise ValueError(
                f"storage_path {self.storage_path!r} is remote, and tracking.tracking_uri is unset: the embedded "
                "SQLite store needs a local folder. Set tracking.tracking_uri to your MLflow server (for example "
                "http://mlflow.internal:5000), or tracking.enabled: false"
            )
        return self

    @property
    def run_dir(self) -> str:
        return self.storage_path.rstrip("/") + "/" + self.name

    @property
    def storage_root(self) -> str:
        """`storage_path` as every stage uses it: an absolute folder, or the URI as given (s3://, gs://)."""
        return self.storage_path.rstrip("/") if "://" in self.storage_path else os.path.abspath(self.storage_path)

    @property
    def registered_model_name(self) -> Optional[str]:
        """The registry name of this run's versions: `tracking.register_model`, else the run name; None when
        registration is off (`register_model: ""`) or tracking is disabled."""
        if not self.tracking.enabled:
            return None
        name = self.tracking.register_model if self.tracking.register_model is not None else self.name
        return name or None


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and what to do."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (["a", "b", "0", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, for example --set data.max_seq_length=1024")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key {key!r} is not a dotted field path such as train.learning_rate")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_override(raw: dict, path: list[str], value: Any, origin: str = "--set") -> None:
    node: Any = raw
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where, origin)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"{origin} {'.'.join(path)}: {'.'.join(path[:i])} is a {type(node).__name__}, not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(path), origin)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{origin} {'.'.join(path)}: its parent is a {type(node).__name__}, not a section")


def _list_index(node: list, part: str, where: str, origin: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"{origin} {where}: {part!r} is not an index of this list (it has {len(node)} items, 0-{len(node) - 1})")
    return int(part)


def read_yaml_mapping(path: str | os.PathLike, error: type[Exception], missing: str, top: str,
                      empty_ok: bool = False) -> dict:
    """A YAML file whose top level is a mapping (an empty file is {} when `empty_ok`); `error` carries
    what is wrong and what to do."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{path}: {missing}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from None
    if raw is None and empty_ok:
        return {}
    if not isinstance(raw, dict):
        raise error(f"{path}: the top level must be a mapping {top}, got {'nothing' if raw is None else 'a ' + type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RayftConfig:
    """Read, override and validate one config file."""
    # An empty file is validated as {}, so the error lists the required sections.
    raw = read_yaml_mapping(path, ConfigError, "no such config file", "of sections (name, model, data, ...)",
                            empty_ok=True)
    return config_from_dict(raw, source=str(path), overrides=overrides)


def config_from_dict(raw: dict, source: str = "<config>", overrides=()) -> RayftConfig:
    raw = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        apply_override(raw, keys, value)
    try:
        return RayftConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, RayftConfig)) from None


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    lines = [f"{source}: {err.error_count()} problem(s) in the config"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            allowed = _fields_at(root, e["loc"][:-1])
            hint = f"unknown field; allowed here: {', '.join(allowed)}" if allowed else "unknown field"
            lines.append(f"  {loc}: {hint}")
        elif kind == "missing":
            lines.append(f"  {loc}: required field is missing")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if not e["loc"]:  # a check across sections: its message names the fields and their values
                lines.append(f"  {msg}")
            else:
                lines.append(f"  {loc}: {_short(e.get('input'))} is not valid: {msg}")
    return "\n".join(lines)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names (as written in YAML) of the model found at `loc`, for 'allowed here' hints."""
    import typing

    cls: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return []
        field = next((f for n, f in cls.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        cls = _model_in(field.annotation, typing)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return [f.alias or n for n, f in cls.model_fields.items()]
    return []


def _model_in(annotation: Any, typing) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg, typing)
        if found is not None:
            return found
    return None


def dump_config(cfg: RayftConfig) -> str:
    """The resolved config as YAML, every default filled in, in the field names a user writes."""
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False, allow_unicode=True)
