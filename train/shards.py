"""Which rows each training worker reads: one fixed shard per rank, cut from the ordered prepared data.

The prepared training rows have one fixed order (shuffled once with `train.seed`, then materialised). With N rows
and W workers, rank r reads the contiguous range

    train: rows [r * L, (r + 1) * L)    L = N // W   (the last N mod W rows are left out, as the plan says)
    eval:  rows [r * n // W, (r + 1) * n // W)       (every eval row is read; sizes differ by at most one)

The driver cuts the materialised datasets at these indices (`Dataset.split_at_indices`, a fixed split of blocks
already in the object store) and hands Ray Train one dataset per rank, named by `shard_name`; a worker asks for its
own by name (`ray.train.get_dataset_shard(shard_name("train", rank))`) and reads those rows only, nothing of the
other ranks' shards. Ray's `streaming_split` is not used on purpose: it hands blocks to whichever worker asks first,
so the rows of a rank differ from run to run.

Guarantees the training loop builds on:
- Disjoint and complete: the ranks' train shards never share a row and together are the epoch's first W * L rows.
- Equal length: every train shard has L rows, so every rank takes the plan's steps and no collective hangs; eval
  shards may differ by one row, and `eval_forwards` says how many forwards every rank runs (a rank with fewer
  batches runs padding forwards whose loss does not count).
- Deterministic on resume: the shard of rank r depends only on the prepared rows (fingerprinted) and W. A resumed
  attempt, after a killed worker, a killed driver or a lost node, cuts the same ranges again, and rank r skips the
  micro batches of its own shard that the checkpoint says were taken. Ranks may land on other nodes; the rows a rank
  reads do not depend on where it runs. A checkpoint written by W workers resumes only with W workers (the resume
  step refuses another count), since another W would be another cut.
"""
from __future__ import annotations

import math
from typing import Any, Optional


def shard_name(split: str, rank: int) -> str:
    """The Ray Train dataset name of one rank's shard of `split` ("train" or "eval")."""
    return f"{split}_rank{rank}"


def train_bounds(rows: int, world: int) -> list[tuple[int, int]]:
    """(start, stop) of each rank's train rows: equal lengths, the remainder left out."""
    per = rows // world
    return [(r * per, (r + 1) * per) for r in range(world)]


def eval_bounds(rows: int, world: int) -> list[tuple[int, int]]:
    """(start, stop) of each rank's eval rows: every row once, lengths differing by at most one."""
    return [(r * rows // world, (r + 1) * rows // world) for r in range(world)]


def eval_forwards(rows: int, world: int, micro_batch_size: int) -> int:
    """Forwards every rank runs in one evaluation: the most batches any rank's eval shard holds."""
    return max(math.ceil((stop - start) / micro_batch_size) for start, stop in eval_bounds(rows, world))


def _cut(ds: Any, bounds: list[tuple[int, int]]) -> list:
    # split_at_indices returns the pieces between consecutive indices; the piece before bounds[0][0] is empty and the
    # piece after the last stop is what equal train shards leave out.
    pieces = ds.split_at_indices([bounds[0][0]] + [stop for _, stop in bounds])
    return pieces[1:len(bounds) + 1]


def shard_datasets(train: Any, eval_: Optional[Any], world: int) -> dict[str, Any]:
    """Ray Train's `datasets`: one fixed shard of each split per rank, named by `shard_name`."""
    out = {}
    for r, piece in enumerate(_cut(train, train_bounds(train.count(), world))):
        out[shard_name("train", r)] = piece
    if eval_ is not None:
        for r, piece in enumerate(_cut(eval_, eval_bounds(eval_.count(), world))):
            out[shard_name("eval", r)] = piece
    return out
