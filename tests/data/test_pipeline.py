"""Tests for jaxpost/data/pipeline.py and prompts.py: order, resume, sharding, counts."""

import collections
import json

import numpy as np
import pytest

from jaxpost.data import (
    InMemorySource,
    check_batch,
    make_prompt_iterator,
    make_sft_iterator,
    record_dataset,
    unpack_batch,
)
from jaxpost.data.pipeline import default_shard
from jaxpost.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
T, B = 32, 4


def _source(n=40):
    # distinct completions so examples can be told apart; lengths vary for packing
    return InMemorySource([{"prompt": f"q{i}:", "completion": "x" * (i % 9) + f"#{i}"}
                           for i in range(n)], schema="sft")


def _ids(batch):
    """Record ids of the examples in a batch, in row/segment order."""
    out = []
    for ex in unpack_batch(batch):
        text = TOK.decode(ex["tokens"], skip_special_tokens=True)
        out.append(int(text.rsplit("#", 1)[1]))
    return out


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def _it(src=None, **kw):
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    kw.setdefault("batch_size", B)
    return make_sft_iterator(src or _source(), TOK, seq_len=T, **kw)


@pytest.mark.parametrize("pack", [True, False])
def test_batches_follow_the_convention(pack):
    it = _it(pack=pack)
    for batch in _take(it, 5):
        check_batch(batch, T)
        assert batch["tokens"].shape == (B, T)
        assert batch["tokens"][batch["segment_ids"] == 0].tolist() == [TOK.pad_id] * int(
            (batch["segment_ids"] == 0).sum())
        if not pack:
            assert batch["segment_ids"].max() == 1


def test_shuffle_is_deterministic_by_seed():
    a = [_ids(b) for b in _take(_it(seed=1), 6)]
    b = [_ids(b) for b in _take(_it(seed=1), 6)]
    c = [_ids(b) for b in _take(_it(seed=2), 6)]
    assert a == b
    assert a != c
    unshuffled = sum((_ids(b) for b in _take(_it(shuffle=False, pack=False), 3)), [])
    assert unshuffled == list(range(3 * B))


def test_each_epoch_is_a_new_permutation():
    ds = record_dataset(list(range(20)), seed=3, num_epochs=2, shard_index=0, shard_count=1)
    order = list(ds)
    assert sorted(order[:20]) == sorted(order[20:]) == list(range(20))
    assert order[:20] != order[20:]


@pytest.mark.parametrize("pack,num_threads", [(True, 0), (True, 2), (False, 1)])
def test_resume_from_state_gives_exactly_the_following_batches(pack, num_threads):
    # num_packing_bins > batch_size: a saved state can fall inside a packing window
    kw = dict(pack=pack, num_threads=num_threads, seed=7,
              num_packing_bins=3 if pack else None)
    n = 12
    it = _it(**kw)
    reference = _take(it, n)
    final_counts = it.stats.to_dict()
    for k in [0, 1, 2, 5, 9]:
        it = _it(**kw)
        _take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as a checkpoint
        resumed = _it(**kw)
        resumed.set_state(state)
        _assert_same(_take(resumed, n - k), reference[k:])
        assert resumed.stats.to_dict() == final_counts  # counts resume too


def test_state_from_other_options_is_refused():
    it = _it(seed=1)
    next(it)
    with pytest.raises(ValueError, match="different data options"):
        _it(seed=2).set_state(it.get_state())
    with pytest.raises(ValueError, match="not an SFT iterator state"):
        _it().set_state({"format": "x"})


def test_processes_partition_every_epoch():
    n, count = 37, 3
    shards = [list(record_dataset(list(range(n)), seed=5, num_epochs=2, shard_index=i,
                                  shard_count=count)) for i in range(count)]
    for epoch in range(2):
        seen = collections.Counter()
        for s in shards:
            # shard i reads positions i, i+count, ... of the shuffled 2-epoch stream
            positions = range(len(s))
            seen.update(x for p, x in zip(positions, s)
                        if epoch * n <= p * count + shards.index(s) < (epoch + 1) * n)
        assert seen == collections.Counter(range(n))


def test_sharded_sft_iterators_see_disjoint_examples_covering_the_data():
    src = _source(24)
    per_shard = []
    for i in range(2):
        it = make_sft_iterator(src, TOK, seq_len=T, batch_size=1, pack=False, num_epochs=1,
                               shard_index=i, shard_count=2)
        per_shard.append([x for b in it for x in _ids(b)])
    assert set(per_shard[0]).isdisjoint(per_shard[1])
    assert sorted(per_shard[0] + per_shard[1]) == list(range(24))


def test_default_shard_is_the_jax_process():
    assert default_shard() == (0, 1)
    assert _it(shard_index=None, shard_count=None).options.shard_count is None


def test_example_outcomes_are_counted():
    recs = [{"prompt": "p", "completion": "c" * 40},  # too long for T=32
            {"prompt": "p" * 40, "completion": "c"},  # prompt fills the row
            {"prompt": "p", "completion": "ok"}] * 4
    src = InMemorySource(recs)
    it = _it(src, truncation="drop", num_epochs=1, pack=False, batch_size=1)
    batches = list(it)
    assert len(batches) == 4
    assert it.stats.to_dict() == {"kept": 4, "truncated": 0, "dropped_too_long": 8,
                                  "dropped_no_targets": 0}
    it = make_sft_iterator(src, TOK, seq_len=T, batch_size=1, truncation="truncate_right",
                           num_epochs=1, pack=False, shard_index=0, shard_count=1)
    assert len(list(it)) == 8
    # one outcome per example: a truncated prompt that leaves no target counts as dropped
    assert it.stats.to_dict() == {"kept": 4, "truncated": 4, "dropped_too_long": 0,
                                  "dropped_no_targets": 4}


def test_packed_and_unpacked_pipelines_see_the_same_examples():
    src = _source(40)
    packed = _it(src, pack=True, num_epochs=1, shuffle=False, batch_size=1)
    padded = _it(src, pack=False, num_epochs=1, shuffle=False, batch_size=1)

    def multiset(it):
        return sorted((tuple(e["tokens"].tolist()), tuple(e["loss_mask"].tolist()))
                      for b in it for e in unpack_batch(b))

    a, b = multiset(packed), multiset(padded)
    assert len(a) == 40 and a == b


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="unknown SFT data options"):
        _it(packing=True)


def test_prompt_iterator_renders_keeps_columns_and_resumes():
    recs = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}], "answer": f"a{i}"}
            for i in range(10)]
    it = make_prompt_iterator(recs, TOK, batch_size=3, seed=0, shard_index=0, shard_count=1)
    first = next(it)
    assert len(first) == 3
    p = first[0]
    assert p["prompt"].startswith("<bos><|user|>q") and p["prompt"].endswith("<|assistant|>")
    assert TOK.decode(p["prompt_ids"]) == p["prompt"]
    assert p["reference"] == p["answer"] and "messages" not in p
    state = json.loads(json.dumps(it.get_state()))
    following = [next(it) for _ in range(4)]
    again = make_prompt_iterator(recs, TOK, batch_size=3, seed=0, shard_index=0, shard_count=1)
    again.set_state(state)
    assert [next(again) for _ in range(4)] == following
    plain = make_prompt_iterator([{"prompt": "2+2=", "answer": "4"}], TOK, batch_size=1,
                                 shard_index=0, shard_count=1)
    assert next(plain)[0]["prompt_ids"] == [TOK.bos_id] + list(b"2+2=")


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume():
    kw = dict(seed=3, num_threads=0)
    reference = _take(_it(**kw), 8)
    it = _it(worker_count=2, **kw)
    try:
        got = _take(it, 4)
        state = json.loads(json.dumps(it.get_state()))
        got += _take(it, 4)
    finally:
        it.close()
    _assert_same(got, reference)
    resumed = _it(worker_count=2, **kw)
    try:
        resumed.set_state(state)
        _assert_same(_take(resumed, 4), reference[4:])
    finally:
        resumed.close()


def test_bad_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="truncation='middle'; expected one of"):
        _it(truncation="middle")
    with pytest.raises(ValueError, match=r"max_len=40 must be in \[2, seq_len=32\]"):
        _it(max_len=40)


def _alarm(seconds):
    """Raises TimeoutError in the main thread after `seconds` (a spinning iterator would
    otherwise hang the test forever)."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def guard():
        def fire(signum, frame):
            raise TimeoutError(f"still iterating after {seconds} s")
        old = signal.signal(signal.SIGALRM, fire)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    return guard()


@pytest.mark.parametrize("pack,num_threads", [(True, 1), (False, 0)])
def test_every_example_dropped_stops_with_an_error_naming_why_instead_of_spinning(pack,
                                                                                  num_threads):
    from jaxpost.data import TooManyDroppedError

    too_long = InMemorySource([{"prompt": "p", "completion": "c" * (40 + i)} for i in range(25)])
    it = _it(too_long, truncation="drop", pack=pack, num_threads=num_threads)
    with _alarm(20), pytest.raises(TooManyDroppedError) as raised:
        next(it)
    message = str(raised.value)
    assert "49 examples in a row were dropped" in message  # 2 passes over 25 records, less one
    assert "truncation='drop'" in message and "data.seq_len" in message, message
    no_targets = InMemorySource([{"prompt": "p" * 40, "completion": "c"}] * 10)
    it = _it(no_targets, truncation="truncate_right", max_consecutive_dropped=7)
    with _alarm(20), pytest.raises(TooManyDroppedError, match="7 examples .* no target token"):
        next(it)


def test_a_few_keepable_examples_among_many_dropped_still_make_batches():
    # 1 in 10 fits. With seed 1 the keeper (record 5) opens epoch 0 and closes epoch 1: a
    # run of 18 drops across the epoch boundary, the longest possible without a fully
    # dropped pass, one short of the default limit (2 passes of 10, less one). (Seeded so
    # that the run comes early: grain's index shuffle costs ~4 ms a read on 10 records.)
    recs = [{"prompt": "p", "completion": "c" * 40}] * 10
    recs[5] = {"prompt": "p", "completion": "ok"}
    order = record_dataset(list(range(10)), seed=1, shard_index=0, shard_count=1)
    assert [i for i in range(21) if order[i] == 5] == [0, 19]  # the run of 18 comes first
    it = _it(InMemorySource(recs), truncation="drop", pack=False, batch_size=1, seed=1)
    with _alarm(60):
        batches = _take(it, 3)
    assert len(batches) == 3 and it.stats.kept == 3
    third = next(i for i in range(20, 30) if order[i] == 5)  # the keeper in epoch 2
    assert it.stats.dropped_too_long == 18 + (third - 20)
    # The same stream with a limit of 18 stops at that run: the run is counted as 18.
    from jaxpost.data import TooManyDroppedError

    it = _it(InMemorySource(recs), truncation="drop", pack=False, batch_size=1, seed=1,
             max_consecutive_dropped=18)
    next(it)
    with _alarm(60), pytest.raises(TooManyDroppedError, match="18 examples in a row"):
        next(it)


def test_block_sharding_deals_each_global_batch_in_process_order():
    # 2 processes x 3 records per batch: the blocks of each global batch, in process
    # order, are exactly one process's batch of 6 (what GRPO rollouts rely on).
    src = list(range(30))
    one = list(record_dataset(src, seed=7, num_epochs=1, shard_index=0, shard_count=1))
    shards = [list(record_dataset(src, seed=7, num_epochs=1, shard_index=i, shard_count=2,
                                  shard_block=3)) for i in range(2)]
    assert [len(s) for s in shards] == [15, 15]
    for b in range(5):
        assert shards[0][3 * b:3 * b + 3] + shards[1][3 * b:3 * b + 3] == one[6 * b:6 * b + 6]
    with pytest.raises(ValueError, match="shard_block=0 must be >= 1"):
        record_dataset(src, shard_index=0, shard_count=2, shard_block=0)
