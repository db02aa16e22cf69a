"""List-of-lists wrappers over data/pack.py's flat packing, for tests: the pipeline packs flat numpy batches
(`pack_flat`, `single_flat`); these take Python lists of examples and return lists of rows."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rayft.data.pack import pack_flat, single_flat


def _flatten(input_ids, loss_masks):
    lengths = [len(x) for x in input_ids]
    flat_ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in input_ids]) if lengths else np.zeros(0, np.int64)
    flat_mask = np.concatenate([np.asarray(x, dtype=bool) for x in loss_masks]) if lengths else np.zeros(0, bool)
    return lengths, flat_ids, flat_mask


def pack_examples(input_ids: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]], block_len: int, pad_id: int) -> dict:
    """Pack examples into blocks. Returns columns of equal-length rows."""
    if not input_ids:
        return {k: [] for k in ("input_ids", "labels", "position_ids", "num_tokens", "num_loss_tokens", "num_examples")}
    out = pack_flat(*_flatten(input_ids, loss_masks), block_len, pad_id)
    return {k: list(v) if v.ndim == 2 else v.tolist() for k, v in out.items()}


def single_examples(input_ids: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]]) -> dict:
    out = {k: [] for k in ("input_ids", "labels", "position_ids", "num_tokens", "num_loss_tokens", "num_examples")}
    if not input_ids:
        return out
    flat = single_flat(*_flatten(input_ids, loss_masks))
    cuts = np.cumsum(flat["lengths"])[:-1]
    for k in ("input_ids", "labels", "position_ids"):
        out[k] = np.split(flat[k], cuts)
    for k in ("num_tokens", "num_loss_tokens", "num_examples"):
        out[k] = flat[k].tolist()
    return out
