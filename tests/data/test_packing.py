"""Tests for jaxpost/data/packing.py: first-fit packing, padding, the streaming packer."""

import collections

import grain
import numpy as np
import pytest

from jaxpost.data.packing import (
    check_batch,
    pack_examples,
    pack_iter_dataset,
    pad_examples,
    stack_rows,
    unpack_batch,
)

T = 16


def _examples(n, seed=0, max_len=T):
    """Examples with distinct token values (example i uses ids 1000*i + j)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, max_len + 1))
        mask = (rng.random(k) < 0.6).astype(np.float32)
        mask[0] = 0.0
        out.append({"tokens": (1000 * i + np.arange(k)).astype(np.int32), "loss_mask": mask})
    return out


def _as_tuples(examples):
    return sorted((tuple(e["tokens"].tolist()), tuple(e["loss_mask"].tolist()))
                  for e in examples)


def _target_pairs(batch):
    """(context token, target token) for every target: what the SFT loss sees."""
    pairs = collections.Counter()
    tok, seg, mask = batch["tokens"], batch["segment_ids"], batch["loss_mask"]
    for b, t in zip(*np.nonzero(mask[:, 1:] > 0)):
        assert seg[b, t] == seg[b, t + 1] != 0  # a target's context is in its segment
        pairs[(int(tok[b, t]), int(tok[b, t + 1]))] += 1
    return pairs


def test_hand_packed_rows_have_segments_and_restarting_positions():
    a = {"tokens": np.array([5, 6, 7], np.int32), "loss_mask": np.array([0, 1, 1], np.float32)}
    b = {"tokens": np.array([8, 9], np.int32), "loss_mask": np.array([0, 1], np.float32)}
    c = {"tokens": np.array([1, 2, 3, 4], np.int32), "loss_mask": np.array([0, 0, 1, 1],
                                                                             np.float32)}
    batch = pack_examples([a, c, b], 6, pad_id=99)
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 7, 8, 9, 99], [1, 2, 3, 4, 99, 99]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]])
    check_batch(batch, 6)


@pytest.mark.parametrize("num_bins", [None, 1, 3, 8])
def test_packing_keeps_every_example_once_whole_and_rows_within_t(num_bins):
    examples = _examples(60, seed=num_bins or 0)
    batch = pack_examples(examples, T, num_bins=num_bins)
    check_batch(batch, T)
    assert batch["tokens"].shape[1] == T
    # every example appears exactly once, contiguous and unsplit
    assert _as_tuples(unpack_batch(batch)) == _as_tuples(examples)
    assert batch["tokens"].shape[0] < len(examples)  # packing did pack


def test_offline_first_fit_puts_each_example_in_the_first_row_with_room():
    examples = _examples(40, seed=3)
    batch = pack_examples(examples, T, pad_id=-1)
    fill = []
    for ex in examples:  # replay first-fit on lengths and compare row choices
        n = len(ex["tokens"])
        r = next((i for i, f in enumerate(fill) if f + n <= T), len(fill))
        if r == len(fill):
            fill.append(0)
        fill[r] += n
        row = np.nonzero(np.any(batch["tokens"] == ex["tokens"][0], axis=1))[0]
        assert row.tolist() == [r]
    assert len(fill) == batch["tokens"].shape[0]


def test_packed_and_padded_give_the_same_examples_and_targets():
    examples = _examples(50, seed=1)
    packed = pack_examples(examples, T, num_bins=4)
    padded = pad_examples(examples, T)
    check_batch(padded, T)
    assert padded["tokens"].shape == (50, T)
    assert _as_tuples(unpack_batch(packed)) == _as_tuples(unpack_batch(padded))
    assert _target_pairs(packed) == _target_pairs(padded)
    assert packed["loss_mask"].sum() == padded["loss_mask"].sum()


def test_pad_examples_layout():
    ex = {"tokens": np.array([3, 4, 5], np.int32), "loss_mask": np.array([0, 0, 1], np.float32)}
    batch = pad_examples([ex], 5, pad_id=7)
    assert batch["tokens"].tolist() == [[3, 4, 5, 7, 7]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 0, 0]]
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 0, 0]]


def test_too_long_or_empty_examples_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="truncate it first"):
        pack_examples(_examples(1, max_len=T) + [
            {"tokens": np.zeros(T + 1, np.int32), "loss_mask": np.zeros(T + 1, np.float32)}], T)
    with pytest.raises(ValueError, match="empty"):
        pad_examples([{"tokens": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.float32)}], T)


def test_check_batch_catches_broken_conventions():
    batch = pack_examples(_examples(10), T)
    bad = {k: v.copy() for k, v in batch.items()}
    bad["positions"][0, 1] += 1
    with pytest.raises(ValueError, match="positions"):
        check_batch(bad)
    bad = {k: v.copy() for k, v in batch.items()}
    bad["loss_mask"][0, 0] = 1.0
    with pytest.raises(ValueError, match="first token"):
        check_batch(bad)
    bad = {k: v.copy() for k, v in batch.items()}
    bad["tokens"] = bad["tokens"].astype(np.int64)
    with pytest.raises(ValueError, match="dtype"):
        check_batch(bad)


@pytest.mark.parametrize("num_bins", [1, 4])
def test_streaming_packer_equals_pack_examples(num_bins):
    examples = _examples(70, seed=5)
    ds = pack_iter_dataset(grain.MapDataset.source(examples).to_iter_dataset(), T,
                           num_bins=num_bins, pad_id=0)
    rows = list(ds)
    streamed = stack_rows(rows)
    expected = pack_examples(examples, T, num_bins=num_bins)
    for k in expected:
        np.testing.assert_array_equal(streamed[k], expected[k])


def test_streaming_packer_resumes_mid_window():
    examples = _examples(70, seed=6)
    ds = pack_iter_dataset(grain.MapDataset.source(examples).to_iter_dataset(), T, num_bins=4)
    it = iter(ds)
    full = list(it)
    for k in [0, 1, 2, 5, 6, len(full) - 1, len(full)]:
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = it.get_state()
        it2 = iter(ds)
        it2.set_state(state)
        rest = list(it2)
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:]):
            np.testing.assert_array_equal(a["tokens"], b["tokens"])
