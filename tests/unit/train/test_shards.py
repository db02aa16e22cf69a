"""The fixed cut of the ordered rows into one shard per rank (train/shards.py), for any row count and world size."""
from hypothesis import given
from hypothesis import strategies as st

from rayft.train.shards import eval_bounds, eval_forwards, shard_name, train_bounds

rows = st.integers(min_value=0, max_value=10_000)
worlds = st.integers(min_value=1, max_value=64)


@given(rows, worlds)
def test_train_shards_are_equal_disjoint_and_leave_out_less_than_one_per_rank(n, world):
    bounds = train_bounds(n, world)
    assert len(bounds) == world
    lengths = {stop - start for start, stop in bounds}
    assert len(lengths) == 1  # equal length on every rank: the same steps, no collective left waiting
    assert bounds[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, so disjoint
    assert 0 <= n - bounds[-1][1] < world


@given(rows, worlds)
def test_eval_shards_cover_every_row_once(n, world):
    bounds = eval_bounds(n, world)
    covered = [i for start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(n))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


@given(rows, worlds, st.integers(min_value=1, max_value=32))
def test_eval_forwards_is_the_longest_shards_batch_count(n, world, micro):
    longest = max(stop - start for start, stop in eval_bounds(n, world))
    assert eval_forwards(n, world, micro) == -(-longest // micro)


def test_the_cut_depends_only_on_rows_and_world():
    assert train_bounds(103, 2) == [(0, 51), (51, 102)]
    assert eval_bounds(9, 2) == [(0, 4), (4, 9)]
    assert shard_name("train", 0) != shard_name("train", 1) != shard_name("eval", 1)
