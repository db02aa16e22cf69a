"""Packing keeps examples apart; collating pads to the batch, not to a fixed length."""
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayft.data.pack import (
    IGNORE_INDEX,
    best_fit_decreasing,
    collate,
    labels_for,
    pack_flat,
    padding_waste_unpacked,
    single_flat,
)
from tests.pack_helpers import pack_examples, single_examples

PAD = 0


# ------------------------------------------------------------------------------- best fit decreasing


def check_bins(bins, lengths, capacity):
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(lengths))), "every example exactly once"
    for b in bins:
        assert b, "no empty bin"
        assert sum(lengths[i] for i in b) <= capacity
        assert b == sorted(b), "original order inside a block"
    assert [b[0] for b in bins] == sorted(b[0] for b in bins)


@given(st.lists(st.integers(1, 64), max_size=200), st.integers(64, 200))
@settings(max_examples=300)
def test_best_fit_decreasing_property(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    check_bins(bins, lengths, capacity)
    # never worse than twice the lower bound (any-fit algorithms leave at most one bin half empty)
    if lengths:
        assert len(bins) <= 2 * (-(-sum(lengths) // capacity))


def test_best_fit_decreasing_random_seeded():
    rng = random.Random(7)
    for _ in range(200):
        cap = rng.randint(16, 512)
        lengths = [rng.randint(1, cap) for _ in range(rng.randint(0, 100))]
        check_bins(best_fit_decreasing(lengths, cap), lengths, cap)


def test_best_fit_decreasing_fills_bins_well():
    # 6+4 and 5+5 make two full bins; first-fit in input order would need three
    assert best_fit_decreasing([6, 5, 5, 4], 10) == [[0, 3], [1, 2]]
    assert best_fit_decreasing([10, 10, 10], 10) == [[0], [1], [2]]
    assert best_fit_decreasing([], 10) == []


def test_best_fit_decreasing_refuses_an_oversized_example():
    with pytest.raises(ValueError, match="example of 11 tokens does not fit a block of 10"):
        best_fit_decreasing([3, 11], 10)


# ---------------------------------------------------------------------------------------- packing


def make_examples(lengths, seed=0):
    """Example k has token ids 100*(k+1) + j (unique, never the pad id) and a mask with some 1s."""
    rng = random.Random(seed)
    ids = [[100 * (k + 1) + j for j in range(n)] for k, n in enumerate(lengths)]
    masks = [[int(j >= n // 2 or rng.random() < 0.2) for j in range(n)] for n in lengths]
    return ids, masks


def segments_of(positions):
    """[start, end) of each run that restarts at position 0."""
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return list(zip(starts[:-1], starts[1:]))


def check_packed(out, ids, masks, block_len):
    rows = len(out["input_ids"])
    assert all(len(out[k][r]) == block_len for r in range(rows) for k in ("input_ids", "labels", "position_ids"))
    seen = Counter()
    for r in range(rows):
        x, lab, pos = (np.asarray(out[k][r]) for k in ("input_ids", "labels", "position_ids"))
        n_real = int(out["num_tokens"][r])
        segs = segments_of(pos.tolist())
        examples = [(s, e) for s, e in segs if e <= n_real]
        assert sum(e - s for s, e in examples) == n_real, "real tokens are whole examples at the front"
        assert out["num_examples"][r] == len(examples)
        for s, e in examples:
            k = int(x[s]) // 100 - 1  # which example this is
            assert x[s:e].tolist() == ids[k], "an example is stored whole and in order"
            assert pos[s:e].tolist() == list(range(e - s)), "positions restart per example"
            assert lab[s] == IGNORE_INDEX, "the first token of an example has no label"
            expected = [t if m else IGNORE_INDEX for t, m in zip(ids[k], masks[k])]
            expected[0] = IGNORE_INDEX
            assert lab[s:e].tolist() == expected, "labels come only from this example's own tokens"
            seen[k] += 1
        # the pad tail
        assert (x[n_real:] == PAD).all()
        assert (lab[n_real:] == IGNORE_INDEX).all()
        if n_real < block_len:
            assert pos[n_real] == 0 and pos[n_real:].tolist() == list(range(block_len - n_real))
        assert out["num_loss_tokens"][r] == int((lab != IGNORE_INDEX).sum())
    assert seen == Counter(range(len(ids))), "every example exactly once"


def test_pack_examples_layout():
    lengths = [5, 3, 8, 2, 7, 4, 6, 1, 9, 10]
    ids, masks = make_examples(lengths)
    out = pack_examples(ids, masks, block_len=12, pad_id=PAD)
    check_packed(out, ids, masks, 12)
    assert sum(out["num_tokens"]) == sum(lengths)
    pad_tokens = 12 * len(out["input_ids"]) - sum(out["num_tokens"])
    assert pad_tokens == sum(int((np.asarray(r) == PAD).sum()) for r in out["input_ids"])
    assert sum(out["num_examples"]) == len(lengths)


@given(st.lists(st.integers(1, 32), min_size=1, max_size=60), st.integers(32, 96))
@settings(max_examples=150)
def test_pack_examples_property(lengths, block_len):
    ids, masks = make_examples(lengths, seed=len(lengths))
    check_packed(pack_examples(ids, masks, block_len, PAD), ids, masks, block_len)


def test_labels_never_cross_into_the_next_example():
    # two fully trained examples in one block: the second one's first token must not be a target
    out = pack_examples([[11, 12, 13], [21, 22]], [[1, 1, 1], [1, 1]], block_len=8, pad_id=PAD)
    assert len(out["input_ids"]) == 1
    assert out["input_ids"][0].tolist() == [11, 12, 13, 21, 22, 0, 0, 0]
    assert out["labels"][0].tolist() == [-100, 12, 13, -100, 22, -100, -100, -100]
    assert out["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert out["num_tokens"] == [5] and out["num_loss_tokens"] == [3] and out["num_examples"] == [2]


def test_full_block_has_no_pad():
    out = pack_examples([[1, 2, 3, 4]], [[0, 0, 1, 1]], block_len=4, pad_id=PAD)
    assert out["num_tokens"] == [4]
    assert out["labels"][0].tolist() == [-100, -100, 3, 4]


def test_no_examples_no_rows():
    out = pack_flat([], [], [], block_len=8, pad_id=PAD)
    assert out["input_ids"].shape == (0, 8) and out["num_examples"].tolist() == []
    assert single_flat([], [], [])["num_tokens"].tolist() == []
    assert pack_examples([], [], 8, PAD)["input_ids"] == [] and single_examples([], [])["input_ids"] == []


def test_pack_flat_matches_the_per_example_layout():
    ids, masks = make_examples([7, 3, 9, 5, 2])
    lengths = [len(x) for x in ids]
    out = pack_flat(lengths, np.concatenate(ids), np.concatenate(masks), block_len=12, pad_id=PAD)
    assert out["input_ids"].shape == (len(out["num_tokens"]), 12)
    check_packed({k: list(v) if v.ndim == 2 else v.tolist() for k, v in out.items()}, ids, masks, 12)
    flat = single_flat(lengths, np.concatenate(ids), np.concatenate(masks))
    assert flat["position_ids"].tolist() == [p for n in lengths for p in range(n)]
    assert flat["num_loss_tokens"].tolist() == [int((labels_for(x, m) != IGNORE_INDEX).sum()) for x, m in zip(ids, masks)]


def test_labels_for():
    assert labels_for([5, 6, 7], [1, 0, 1]).tolist() == [-100, -100, 7]
    assert labels_for([], []).tolist() == []


def test_single_examples_one_row_each():
    ids, masks = make_examples([4, 2, 6])
    out = single_examples(ids, masks)
    assert [r.tolist() for r in out["input_ids"]] == ids
    assert [r.tolist() for r in out["position_ids"]] == [list(range(n)) for n in (4, 2, 6)]
    assert out["num_tokens"] == [4, 2, 6]
    assert out["num_examples"] == [1, 1, 1]
    for r, (x, m) in enumerate(zip(ids, masks)):
        assert out["labels"][r].tolist() == labels_for(x, m).tolist()
        assert out["num_loss_tokens"][r] == int((out["labels"][r] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------- collate


def test_collate_unpacked_pads_to_the_longest_in_the_batch():
    ids, masks = make_examples([3, 5, 2])
    rows = single_examples(ids, masks)
    batch = collate(rows, pad_id=PAD, packed=False)
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert tuple(batch["input_ids"].shape) == (3, 5)  # the longest row, not max_seq_length
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["input_ids"][0].tolist() == ids[0] + [PAD, PAD]
    assert batch["labels"][2].tolist()[2:] == [IGNORE_INDEX] * 3
    assert batch["labels"][1].tolist() == rows["labels"][1].tolist()
    assert batch["position_ids"][0].tolist()[:3] == [0, 1, 2]
    for t in batch.values():
        assert str(t.dtype) == "torch.int64"


def test_collate_unpacked_width_follows_each_batch():
    ids, masks = make_examples([2, 4])
    assert collate(single_examples(ids[:1], masks[:1]), PAD, packed=False)["input_ids"].shape[1] == 2
    assert collate(single_examples(ids, masks), PAD, packed=False)["input_ids"].shape[1] == 4


def test_collate_packed_has_no_attention_mask():
    ids, masks = make_examples([5, 3, 8, 2])
    out = pack_examples(ids, masks, block_len=10, pad_id=PAD)
    batch = collate(out, pad_id=PAD, packed=True)
    assert "attention_mask" not in batch
    assert tuple(batch["input_ids"].shape) == (len(out["input_ids"]), 10)
    assert batch["position_ids"].tolist() == [r.tolist() for r in out["position_ids"]]
    assert batch["labels"].tolist() == [r.tolist() for r in out["labels"]]


def test_collate_accepts_lists():
    batch = collate({"input_ids": [[1, 2], [3]], "labels": [[-100, 2], [-100]], "position_ids": [[0, 1], [0]]}, PAD, packed=False)
    assert batch["input_ids"].tolist() == [[1, 2], [3, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_padding_waste_unpacked():
    # batches [3, 5] -> width 5, 2 pads; [4, 2] -> width 4, 2 pads; [6] -> none
    assert padding_waste_unpacked([3, 5, 4, 2, 6], batch_size=2) == (4, 10 + 8 + 6)
    assert padding_waste_unpacked([3, 3], batch_size=8) == (0, 6)
