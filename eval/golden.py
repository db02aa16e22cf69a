"""The golden set: conversations whose last assistant turn is the reference answer, the turns before it the prompt.

By default it is the run's eval split, read the way the data pipeline splits it (same normalisation, redaction,
dedup and split hash) but kept as text; `eval.sources` names a golden set of its own. The sources are read on the
driver with the pipeline's readers (a golden set is small). A row that cannot be used is reported with its source,
row and reason, never dropped silently.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from rayft.data.config import DataConfig


@dataclass
class GoldenExample:
    id: str  # "<source>:<row>"
    prompt: list[dict]  # the messages before the reference turn
    reference: str
    tools: list[dict] = field(default_factory=list)  # the row's tools, rendered into the prompt
    reference_calls: list[dict] = field(default_factory=list)  # [{name, arguments}] when the reference turn calls tools


@dataclass
class GoldenSet:
    examples: list[GoldenExample]
    origin: str  # "the eval split" | "eval.sources"
    rejected: list[dict] = field(default_factory=list)  # {source, file, row, reason, detail}

    def describe(self) -> str:
        text = f"golden set: {len(self.examples)} example(s) from {self.origin}"
        if self.rejected:
            reasons = Counter(r["reason"] for r in self.rejected)
            text += f"; {len(self.rejected)} row(s) not usable ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))})"
        return text

    def sample(self, n: Optional[int], seed: int) -> list[GoldenExample]:
        """A seeded sample of `n` examples in their original order (all of them when n is None or larger)."""
        return sample(self.examples, n, seed)


def sample(examples: list, n: Optional[int], seed: int) -> list:
    if n is None or n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def load_golden(data: DataConfig, sources: Optional[list] = None, log: Callable[[str], None] = print) -> GoldenSet:
    """The golden set of `eval.sources` when given, else the eval split of `data`."""
    from rayft.data.pipeline import _unit_hash, plan_sources

    from .config import EvalError

    own = bool(sources)
    cfg = data.model_copy(update={"sources": list(sources)}) if own else data
    plans = plan_sources(cfg, log=lambda m: None)
    examples: list[GoldenExample] = []
    rejected: list[dict] = []
    seen: set[str] = set()
    for p in plans:
        if not own and p.config["split"] == "train":
            continue
        for file in p.files:
            for row, messages, tools, reason, detail in _read_rows(file, p, cfg):
                if reason:
                    if own:  # the eval split's rejects are the training run's (its rejects file)
                        rejected.append({"source": p.name, "file": file, "row": row, "reason": reason,
                                         "detail": detail})
                    continue
                key = hashlib.blake2b(_content_key(messages, tools).encode(), digest_size=16).hexdigest()
                if not own and p.config["split"] is None and _unit_hash(data.seed, "split", key) >= data.eval_fraction:
                    continue  # a training row
                if data.dedup and key in seen:
                    continue  # the pipeline keeps the first copy only
                seen.add(key)
                # The reference turn: the first trained assistant turn that calls tools (choosing the tool and its
                # arguments is the skill a tool row teaches), else the last trained assistant turn.
                trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1)]
                calling = [i for i in trained if messages[i].get("tool_calls")]
                last = calling[0] if calling else (trained[-1] if trained else None)
                if last is None:
                    rejected.append({"source": p.name, "file": file, "row": row, "reason": "no_reference",
                                     "detail": "no assistant turn to compare the answer with"})
                    continue
                content = messages[last]["content"]
                reference = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
                if messages[last].get("tool_calls"):
                    from rayft.data.chat import assistant_text

                    reference = assistant_text(messages[last])  # its text and its <tool_call> blocks
                calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                         for c in messages[last].get("tool_calls") or ()]
                examples.append(GoldenExample(f"{p.name}:{row}", messages[:last], reference, tools or [], calls))
    if not examples:
        where = ("eval.sources" if own else
                 f"the eval split (data.eval_fraction {data.eval_fraction} of {len(plans)} source(s))")
        fix = ("check the paths and schema of eval.sources" if own else
               "raise data.eval_fraction, mark a source `split: eval`, or give eval.sources")
        raise EvalError(f"the golden set is empty: {where} holds no usable conversation; {fix}")
    return GoldenSet(examples, "eval.sources" if own else "the eval split", rejected)


def _read_rows(file: str, plan, cfg: DataConfig):
    """(row, messages, tools, reason, detail) per record, as the pipeline's first stage normalises it."""
    from rayft.data.formats import iter_records, read_bytes
    from rayft.data.redact import redact_messages
    from rayft.data.schemas import Reject, apply_column_map, read_conversation, used_columns

    src = plan.config
    fmt = plan.formats[file]
    for rec in iter_records(read_bytes(file), fmt, cfg.rejects_sample_chars):
        if rec.record is None:
            yield rec.row, None, None, rec.reason, rec.detail
            continue
        try:
            record = used_columns(rec.record, plan.schema, src["column_map"])
            messages, tools = read_conversation(apply_column_map(record, src["column_map"]), plan.schema,
                                                src["system_prompt"])
            if cfg.redact_pii:
                messages, _ = redact_messages(messages)
        except Reject as r:
            yield rec.row, None, None, r.reason, r.detail
            continue
        yield rec.row, messages, tools, "", ""


def _content_key(messages: list[dict], tools: Optional[list[dict]] = None) -> str:
    from rayft.data.schemas import content_key

    return content_key(messages, tools)
