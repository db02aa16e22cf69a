"""The learning-rate schedule: linear warmup, then linear or cosine decay to zero (or constant)."""
from __future__ import annotations

import math
from typing import Callable


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate after `step` optimizer steps (a `LambdaLR` function)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_steps_for(warmup_steps: int | None, warmup_ratio: float, total_steps: int) -> int:
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return int(round(warmup_ratio * total_steps))
