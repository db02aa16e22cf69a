"""Loss on assistant tokens only: summed per micro batch, divided by the unmasked tokens of the whole window."""
from __future__ import annotations

from rayft.data.pack import IGNORE_INDEX


def sum_token_loss(logits, labels):
    """Summed cross-entropy of the labelled tokens. Position t predicts token t+1 (labels are unshifted)."""
    import torch

    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")


def count_loss_tokens(labels) -> int:
    """Labelled tokens a row contributes (the first position predicts nothing)."""
    import numpy as np

    labels = np.asarray(labels)
    return int((labels[..., 1:] != IGNORE_INDEX).sum())
