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


def pack_examples(input_ids: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]], block_len: int, pad_id: int) -> dict:
    """Pack examples into blocks. Returns columns of equal-length rows."""
    lengths = [len(x) for x in input_ids]
    bins = best_fit_decreasing(lengths, block_len)
    out = {k: [] for k in ("input_ids", "labels", "position_ids", "num_tokens", "num_loss_tokens", "num_examples")}
    for b in bins:
        ids = np.full(block_len, pad_id, dtype=np.int32)
        labels = np.full(block_len, IGNORE_INDEX, dtype=np.int32)
        pos = np.zeros(block_len, dtype=np.int32)
        at = 0
        loss = 0
        for i in b:
            n = lengths[i]
            ids[at: at + n] = input_ids[i]
            lab = labels_for(input_ids[i], loss_masks[i])
            labels[at: at + n] = lab
            loss += int((lab != IGNORE_INDEX).sum())
            pos[at: at + n] = np.arange(n, dtype=np.int32)
            at += n
        pos[at:] = np.arange(block_len - at, dtype=np.int32)  # the pad tail is its own segment
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(pos)
        out["num_tokens"].append(at)
        out["num_loss_tokens"].append(loss)
        out["num_examples"].append(len(b))
    return out


def single_examples(input_ids: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[int]]) -> dict:
    out = {k: [] for k in ("input_ids", "labels", "position_ids", "num_tokens", "num_loss_tokens", "num_examples")}
    for ids, mask in zip(input_ids, loss_masks):
        lab = labels_for(ids, mask).astype(np.int32)
        out["input_ids"].append(np.asarray(ids, dtype=np.int32))
        out["labels"].append(lab)
        out["position_ids"].append(np.arange(len(ids), dtype=np.int32))
        out["num_tokens"].append(len(ids))
        out["num_loss_tokens"].append(int((lab != IGNORE_INDEX).sum()))
        out["num_examples"].append(1)
    return out


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
