"""The `eval:` section: the golden set, the metrics that score it, and how answers are generated.

    eval:
      sources:                       # unset: the run's eval split (data.eval_fraction, sources with split: eval)
        - {path: data/golden.jsonl, schema: qa}
      metrics: [exact_match, token_f1, rouge_l]
      max_new_tokens: 64
      search_sample: 8               # examples scored at each evaluation step of a search trial (tune.metric)
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rayft.data.config import SourceConfig

MetricName = Literal["exact_match", "token_f1", "rouge_l", "json_valid", "json_schema", "tool_name_match",
                     "tool_args_match"]
METRIC_NAMES: tuple[str, ...] = ("exact_match", "token_f1", "rouge_l", "json_valid", "json_schema", "tool_name_match",
                                 "tool_args_match")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class LmEvalConfig(_Section):
    """lm-eval-harness tasks, from local YAML files only (nothing is downloaded at run time)."""

    tasks: list[str] = Field(
        min_length=1, description="Task YAML files (lm-eval's format) or folders of them; each task's data must be a "
        "local file (`dataset_path: json` with `dataset_kwargs: {data_files: ...}`).")
    num_fewshot: Optional[int] = Field(default=None, ge=0, description="Few-shot examples; unset: the task's own.")
    limit: Optional[int] = Field(default=None, ge=1, description="At most this many documents per task.")
    batch_size: int = Field(default=8, ge=1, description="lm-eval's batch size.")


class EvalConfig(_Section):
    """Task metrics on a golden set: `rayft eval`, a search's `tune.metric`, and `promotion.policy: better_metric`."""

    sources: list[SourceConfig] = Field(
        default_factory=list,
        description="The golden set: any source the data pipeline reads (same fields as data.sources). Empty: the "
        "run's eval split. The last assistant turn of each conversation is the reference answer (in a tool-calling "
        "row, the first assistant turn that calls tools: its calls are the reference); the turns before it, and the "
        "row's tools, are the prompt.")
    metrics: list[MetricName] = Field(
        default_factory=lambda: ["exact_match", "token_f1", "rouge_l"], min_length=1,
        description="`exact_match` and `token_f1` (after lower-casing and removing punctuation and articles), "
        "`rouge_l` (F-measure of the longest common token subsequence), `json_valid` (the answer parses as JSON), "
        "`json_schema` (it parses and validates against `json_schema`), `tool_name_match` (the answer calls the same "
        "functions as the reference, or none when it calls none) and `tool_args_match` (same functions with equal "
        "argument JSON, in any order); the tool metrics read the default chat layout's <tool_call> blocks.")
    json_schema: Optional[Union[str, dict[str, Any]]] = Field(
        default=None, description="For the `json_schema` metric: a JSON Schema, inline or the path of a .json file.")
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Longest generated answer, in tokens.")
    batch_size: int = Field(default=16, ge=1, description="Prompts generated together (left-padded, greedy).")
    max_examples: Optional[int] = Field(
        default=None, ge=1, description="Score at most this many golden examples (a seeded sample); unset: all.")
    search_sample: int = Field(
        default=8, ge=1, description="Examples (a seeded sample of the golden set) a search trial scores at each "
        "evaluation step when `tune.metric` names a task metric; the same sample for every trial and step.")
    search_max_new_tokens: int = Field(
        default=16, ge=1, le=4096, description="Longest answer in a search trial's evaluation (generation is the "
        "cost of a task metric: on the quickstart, 8 answers of 16 tokens cost about one eval-loss pass).")
    bootstrap_samples: int = Field(default=1000, ge=100, description="Resamples of the paired bootstrap.")
    seed: int = Field(default=0, description="Seed of the samples and of the bootstrap.")
    lm_eval: Optional[LmEvalConfig] = Field(
        default=None, description="lm-eval-harness tasks run by `rayft eval` as well (pip install 'rayft[eval]').")

    @field_validator("metrics")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({m for m in v if v.count(m) > 1})
        if dup:
            raise ValueError(f"{', '.join(dup)} named more than once; name each metric once")
        return v

    @field_validator("json_schema")
    @classmethod
    def _schema_is_a_schema(cls, v):
        if isinstance(v, dict):
            check_schema(v, "eval.json_schema")
        return v

    @model_validator(mode="after")
    def _schema_for_schema_metric(self):
        if "json_schema" in self.metrics and self.json_schema is None:
            raise ValueError("metrics has json_schema but eval.json_schema is unset; give a JSON Schema (inline, or "
                             "the path of a .json file), or remove json_schema from metrics")
        return self

    def resolved_schema(self) -> Optional[dict]:
        """The JSON Schema as a mapping (read from its file when a path was given)."""
        if self.json_schema is None or isinstance(self.json_schema, dict):
            return self.json_schema
        from rayft.data import storage

        path = self.json_schema
        if not storage.is_file(path):
            raise EvalError(f"eval.json_schema: {path!r} is not a file; give the path of a JSON Schema file or the "
                            f"schema inline")
        try:
            schema = json.loads(storage.read_text(path))
        except (ValueError, UnicodeDecodeError) as e:
            raise EvalError(f"eval.json_schema: {path!r} is not JSON ({e}); fix the file") from None
        check_schema(schema, f"eval.json_schema ({path})")
        return schema


class EvalError(ValueError):
    """An evaluation that cannot run; the message names the field or source, the value and the fix."""


def check_schema(schema: Any, where: str) -> None:
    import jsonschema

    if not isinstance(schema, dict):
        raise EvalError(f"{where}: a JSON Schema is a mapping, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise EvalError(f"{where}: not a valid JSON Schema ({e.message}); fix it (see json-schema.org)") from None
