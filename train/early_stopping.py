"""Early stopping on eval loss: patience and threshold."""
from __future__ import annotations

from typing import Optional


def observe_eval(best: Optional[float], bad_evals: int, eval_loss: float, patience: Optional[int],
                 threshold: float) -> tuple[float, int, bool]:
    """After one evaluation: (best loss so far, evaluations without improvement, stop now?).

    An eval loss improves only if it is below the best by more than `threshold`.
    """
    if best is None or eval_loss < best - threshold:
        return eval_loss, 0, False
    bad_evals += 1
    return best, bad_evals, bool(patience) and bad_evals >= patience
