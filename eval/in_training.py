"""The task metric inside a search trial: at each evaluation step the training worker answers a fixed sample of the
golden set and scores it, so ASHA stops trials on the metric the search optimises (`tune.metric`).

The driver renders the prompts once (`build_payload`); the payload travels in the worker's config. Every rank
answers its own share of the sample (ranks hold the whole model under ZeRO-0/1/2); under ZeRO-3 each forward is
collective, so every rank runs the same number of `generate` calls with `synced_gpus` (a rank that is done keeps
stepping until all are), and the per-rank sums are added across ranks.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

from .config import EvalConfig
from .golden import GoldenExample


def build_payload(examples: Sequence[GoldenExample], metric: str, cfg: EvalConfig, tokenizer, tokenizer_spec: dict,
                  chat_template: Optional[str] = None) -> dict:
    """What a worker needs to score `metric` on `examples`: prompt texts, references, generation settings."""
    from .generate import prompt_texts

    return {"metric": metric, "texts": prompt_texts([e.prompt for e in examples], tokenizer, chat_template,
                         [e.tools for e in examples]),
            "references": [e.reference for e in examples], "ids": [e.id for e in examples],
            "tokenizer": tokenizer_spec, "max_new_tokens": cfg.search_max_new_tokens, "batch_size": cfg.batch_size,
            "schema": cfg.resolved_schema() if metric == "json_schema" else None}


def score_sample(model, tokenizer, payload: dict, rank: int, world: int,
                 all_sum: Callable[..., list[float]], zero3: bool) -> dict[str, float]:
    """`{metric: mean over the sample, "task_eval_s": seconds}`, the same on every rank."""
    from .generate import generate_answers
    from .metrics import scorers

    t0 = time.perf_counter()
    texts, refs = payload["texts"], payload["references"]
    mine = list(range(rank, len(texts), world))
    batches = math.ceil(math.ceil(len(texts) / world) / payload["batch_size"])
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    answers = generate_answers(model, tokenizer, [texts[i] for i in mine], payload["max_new_tokens"],
                               payload["batch_size"],
                               max_prompt_tokens=max(1, limit - payload["max_new_tokens"]) if limit else None,
                               synced_gpus=zero3, min_batches=batches if zero3 else 0)
    name = payload["metric"]
    fn = scorers([name], payload.get("schema"))[name]
    total, count = all_sum(sum(fn(a, refs[i]) for a, i in zip(answers, mine)), float(len(mine)))
    return {name: total / max(count, 1.0), "task_eval_s": time.perf_counter() - t0}
