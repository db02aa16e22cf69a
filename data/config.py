"""The `data:` section of a rayft config.

Every field is documented here; the README's config reference is generated from these models.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Format = Literal["auto", "json", "jsonl", "csv", "parquet"]
Schema = Literal["auto", "alpaca", "sharegpt", "openai", "prompt_completion", "qa"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class SourceConfig(_Section):
    """One input source: a file, a glob or a folder, local or any fsspec/pyarrow URI (s3://, gs://)."""

    path: str = Field(description="File, glob (`data/*.jsonl`) or folder; local path or URI such as `s3://bucket/prefix/`.")
    name: Optional[str] = Field(
        default=None, description="Name used in the report and the rejects file; defaults to the file stem."
    )
    format: Format = Field(default="auto", description="File format; `auto` decides from the file extension.")
    data_schema: Schema = Field(
        default="auto",
        alias="schema",
        description="Row layout; `auto` detects it from the columns of the first rows and reports the choice.",
    )
    column_map: dict[str, str] = Field(
        default_factory=dict,
        description="Rename columns before schema detection, `{their_name: our_name}` "
        "(for example `{ticket_text: question, resolution: answer}`).",
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        description="Sampling ratio when mixing sources: 2.0 repeats every training row twice, 0.5 keeps a "
        "deterministic half. Eval rows are never re-weighted.",
    )
    split: Optional[Literal["train", "eval"]] = Field(
        default=None,
        description="Send the whole source to one split; unset sources are split by `eval_fraction`.",
    )
    system_prompt: Optional[str] = Field(
        default=None, description="System message prepended to conversations of this source that have none."
    )

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("path is empty; give a file, a glob or a folder")
        return v

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        stem = self.path.rstrip("/").split("/")[-1]
        for ch in "*?[":
            stem = stem.replace(ch, "")
        return stem.split(".")[0] or "source"


class DataConfig(_Section):
    """How sources become training examples."""

    sources: list[SourceConfig] = Field(min_length=1, description="Input sources, mixed into one dataset.")
    max_seq_length: int = Field(
        default=512, ge=16, le=1_048_576, description="Tokens per training example (and per packed block)."
    )
    truncation: Literal["drop_oldest_turns", "truncate_end", "reject"] = Field(
        default="drop_oldest_turns",
        description="What to do with a conversation longer than `max_seq_length`: drop the oldest user/assistant "
        "exchanges (the system message stays), cut the token tail, or reject it. A conversation that still does "
        "not fit, or has no assistant token left, is rejected with reason `too_long`.",
    )
    packing: bool = Field(
        default=True,
        description="Pack examples into fixed blocks of `max_seq_length` tokens; positions restart per example and "
        "no label crosses examples. Off: one example per row, padded to the longest in each batch at train time.",
    )
    dedup: bool = Field(default=True, description="Remove exact duplicate conversations (after whitespace normalisation).")
    redact_pii: bool = Field(
        default=False,
        description="Replace emails, phone numbers, Luhn-valid card numbers and IPv4 addresses with placeholders.",
    )
    eval_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Share of rows (from sources without `split`) held out for eval."
    )
    seed: int = Field(default=42, description="Seed for the train/eval split and for weight sampling.")
    chat_template: Optional[str] = Field(
        default=None,
        description="Jinja chat template overriding the tokenizer's. Unset: the tokenizer's own, or rayft's "
        "default ChatML layout when the tokenizer has none.",
    )
    rejects_sample_chars: int = Field(
        default=4000, ge=0, description="Longest raw row kept in the rejects file (longer ones are cut, and say so)."
    )
    read_block_mb: int = Field(
        default=64,
        description="Bytes one read task takes from a large file: JSON Lines files are cut into ranges of this size at "
        "line boundaries and Parquet files into groups of row groups, each read by its own task (ranged reads on "
        "object stores). JSON arrays and CSV files are read whole, one task per file (a CSV cell may hold a newline).",
    )
    driver_memory_mb: int = Field(
        default=1024,
        description="Memory the driver process may use for data, on top of its own code: the blocks it reads when "
        "it sniffs sources, writes the rejects file and builds the report are sized from it. The data itself "
        "streams through Ray's workers and object store; the driver's use stays flat as the data grows.",
    )

    @field_validator("read_block_mb")
    @classmethod
    def _read_block(cls, v: int) -> int:
        if not 1 <= v <= 4096:
            raise ValueError(f"read_block_mb {v} is out of range; set 1 to 4096 (MiB per read task, 64 by default)")
        return v

    @field_validator("driver_memory_mb")
    @classmethod
    def _driver_memory(cls, v: int) -> int:
        if v < 32:
            raise ValueError(f"driver_memory_mb {v} is too small for the driver to read a block and keep its own "
                             f"bookkeeping; set 32 or more (MiB, 1024 by default)")
        return v

    @model_validator(mode="after")
    def _unique_source_names(self) -> "DataConfig":
        seen: dict[str, int] = {}
        for i, s in enumerate(self.sources):
            n = s.display_name
            if n in seen:
                raise ValueError(
                    f"sources {seen[n]} and {i} are both named {n!r}; give each a distinct `name`"
                )
            seen[n] = i
        return self
