"""Packing tokenized examples into fixed-length blocks, and collating rows into model batches.

A packed block holds whole examples side by side. `position_ids` restart at 0 for each example,
which is how transformers (sdpa/eager) builds a block-diagonal causal mask when no attention mask
is passed, so examples never attend to each other. The first token of each example has no label,
so no label is ever predicted from the previous example. The pad tail is its own segment with no
labels.

Row layout handed to training (both modes): `input_ids`, `labels` (-100 = no loss), `position_ids`,
`num_tokens` (non-pad), `num_loss_tokens`, `num_examples`. Packed rows all have length
`max_seq_length`; unpacked rows have their own length and are padded per batch by `collate`.
"""
from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np

IGNORE_INDEX = -100


def labels_for(input_ids: Sequence[int], loss_mask: Sequence[int]) -> np.ndarray:
    ids = np.asarray(input_ids, dtype=np.int64)
    labels = np.where(np.asarray(loss_mask, dtype=bool), ids, IGNORE_INDEX)
    if len(labels):
        labels[0] = IGNORE_INDEX  # nothing before it in this example to predict it from
    return labels


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of at most `capacity` tokens (best-fit decreasing)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), kept sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example of {n} tokens does not fit a block of {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            rem, b = free.pop(k)
            bins[b].append(i)
            if rem - n > 0:
                bisect.insort(free, (rem - n, b))
        else:
            bins.append([i])
            if capacity - n > 0:
                bisect.insort(free, (capacity - n, len(bins) - 1))
    for b in bins:
        b.sort()  # keep the original order inside a block
    bins.sort(key=lambda b: b[0])
    return bins


def pack_flat(lengths, flat_ids, flat_mask, block_len: int, pad_id: int) -> dict:
    """Vectorised packing of examples given as one flat token array plus lengths.

    Returns 2-D arrays (blocks x block_len) `input_ids`, `labels`, `position_ids` and per-block
    `num_tokens`, `num_loss_tokens`, `num_examples`.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    flat_ids = np.asarray(flat_ids, dtype=np.int64)
    flat_mask = np.asarray(flat_mask, dtype=bool)
    bins = best_fit_decreasing(lengths.tolist(), block_len)
    nb = len(bins)
    sizes = np.fromiter((len(b) for b in bins), dtype=np.int64, count=nb)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=int(sizes.sum()))
    bin_of = np.repeat(np.arange(nb, dtype=np.int64), sizes)
    lens = lengths[order]
    total = int(lens.sum())
    excl = np.cumsum(lens) - lens  # where each example starts in the packed order
    first = np.cumsum(sizes) - sizes  # index (in order) of each block's first example
    within = excl - excl[first][bin_of]  # where each example starts inside its block
    src_start = (np.cumsum(lengths) - lengths)[order]
    step = np.arange(total, dtype=np.int64) - np.repeat(excl, lens)  # position inside the example
    src = np.repeat(src_start, lens) + step
    dst = np.repeat(bin_of * block_len + within, lens) + step
    ids = np.full(nb * block_len, pad_id, dtype=np.int32)
    labels = np.full(nb * block_len, IGNORE_INDEX, dtype=np.int32)
    pos = np.zeros(nb * block_len, dtype=np.int32)
    tok = flat_ids[src]
    ids[dst] = tok
    lab = np.where(flat_mask[src], tok, IGNORE_INDEX)
    lab[step == 0] = IGNORE_INDEX  # an example's first token is never predicted from the previous example
    labels[dst] = lab
    pos[dst] = step
    used = np.bincount(bin_of, weights=lens, minlength=nb).astype(np.int64)
    col = np.arange(block_len, dtype=np.int64)[None, :]
    pos2d = pos.reshape(nb, block_len)
    tail = col >= used[:, None]
    pos2d[tail] = (col - used[:, None])[tail]  # the pad tail is its own segment
    loss = np.bincount(np.repeat(bin_of, lens)[lab != IGNORE_INDEX], minlength=nb)
    return {
        "input_ids": ids.reshape(nb, block_len), "labels": labels.reshape(nb, block_len), "position_ids": pos2d,
        "num_tokens": used.astype(np.int32), "num_loss_tokens": loss.astype(np.int32), "num_examples": sizes.astype(np.int32),
    }


def single_flat(lengths, flat_ids, flat_mask) -> dict:
    """One example per row: flat `input_ids`, `labels`, `position_ids` plus per-row counts."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = np.asarray(flat_ids, dtype=np.int32)
    starts = np.cumsum(lengths) - lengths
    step = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
    labels = np.where(np.asarray(flat_mask, dtype=bool), ids, IGNORE_INDEX).astype(np.int32)
    labels[step == 0] = IGNORE_INDEX
    loss = np.add.reduceat((labels != IGNORE_INDEX).astype(np.int64), starts) if len(lengths) and lengths.min() > 0 else \
        np.array([int((labels[s:s + n] != IGNORE_INDEX).sum()) for s, n in zip(starts, lengths)], dtype=np.int64)
    return {"input_ids": ids, "labels": labels, "position_ids": step.astype(np.int32), "lengths": lengths,
            "num_tokens": lengths.astype(np.int32), "num_loss_tokens": np.asarray(loss, dtype=np.int32),
            "num_examples": np.ones(len(lengths), dtype=np.int32)}


def collate(rows: dict, pad_id: int, packed: bool):
    """Columns of a batch (lists or arrays per row) -> torch tensors for the model.

    Unpacked rows are padded to the longest row in this batch, with an attention mask. Packed rows
    are already full length; no attention mask is passed, so the model derives the block-diagonal
    mask from the restarting `position_ids`.
    """
    import torch

    ids = [np.asarray(x) for x in rows["input_ids"]]
    labels = [np.asarray(x) for x in rows["labels"]]
    pos = [np.asarray(x) for x in rows["position_ids"]]
    width = max(len(x) for x in ids)
    n = len(ids)
    out_ids = np.full((n, width), pad_id, dtype=np.int64)
    out_labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    out_pos = np.zeros((n, width), dtype=np.int64)
    attn = np.zeros((n, width), dtype=np.int64)
    for i in range(n):
        k = len(ids[i])
        out_ids[i, :k] = ids[i]
        out_labels[i, :k] = labels[i]
        out_pos[i, :k] = pos[i]
        if k < width:
            out_pos[i, k:] = np.arange(width - k)
        attn[i, :k] = 1
    batch = {
        "input_ids": torch.from_numpy(out_ids),
        "labels": torch.from_numpy(out_labels),
        "position_ids": torch.from_numpy(out_pos),
    }
    if not packed:
        batch["attention_mask"] = torch.from_numpy(attn)
    return batch


def padding_waste_unpacked(lengths: Sequence[int], batch_size: int) -> tuple[int, int]:
    """(pad tokens, all tokens) when consecutive rows are batched and padded to the longest."""
    pad = total = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i: i + batch_size]
        width = max(chunk)
        total += width * len(chunk)
        pad += width * len(chunk) - sum(chunk)
    return pad, total
