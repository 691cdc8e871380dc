"""Tests for jaxpost/data/synthetic.py: the addition demo task."""

import pytest

from jaxpost.data import check_batch, make_sft_iterator
from jaxpost.data.synthetic import (
    addition_pairs,
    addition_prompts,
    addition_reward,
    addition_source,
    exact_match,
    make_addition_records,
    parse_question,
    split_of,
)
from jaxpost.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_records_are_chat_additions_with_correct_answers():
    recs = make_addition_records(200, seed=0)
    for r in recs:
        user, asst = r["messages"]
        assert user["role"] == "user" and asst["role"] == "assistant"
        a, b = parse_question(user["content"])
        assert asst["content"] == r["answer"] == str(a + b)
        assert 0 <= a < 1000 and 0 <= b < 1000


def test_generation_is_deterministic_by_seed():
    assert addition_pairs(100, seed=4) == addition_pairs(100, seed=4)
    assert addition_pairs(100, seed=4) != addition_pairs(100, seed=5)
    assert len(set(addition_pairs(500, seed=1))) == 500  # unique by default


@pytest.mark.parametrize("seeds", [(0, 0), (0, 1), (7, 3)])
def test_train_and_heldout_never_overlap(seeds):
    train = set(addition_pairs(3000, seed=seeds[0], split="train"))
    heldout = set(addition_pairs(300, seed=seeds[1], split="heldout"))
    assert train.isdisjoint(heldout)
    assert all(split_of(a, b) == "heldout" for a, b in heldout)
    assert all(split_of(a, b) == "train" for a, b in list(train)[:200])


def test_small_digit_counts_and_exhaustion():
    pairs = addition_pairs(50, seed=0, max_digits=1)
    assert all(a < 10 and b < 10 for a, b in pairs)
    with pytest.raises(ValueError, match="ask for fewer"):
        addition_pairs(50, seed=0, split="heldout", max_digits=1)  # ~10 such pairs exist
    with pytest.raises(ValueError, match="unknown split"):
        addition_pairs(1, seed=0, split="test")


def test_byte_examples_are_short():
    for r in make_addition_records(500, seed=2):
        n = len(TOK.encode(TOK.apply_chat_template(r["messages"])))
        assert n <= 24  # <bos><|user|>What is 999+999?<|assistant|>1998<eos>


def test_exact_match_is_robust_to_eos_and_whitespace():
    assert exact_match("405", "405")
    assert exact_match(" 405\n", "405")
    assert exact_match("405<eos>", "405")
    assert exact_match("405<eos><pad><pad>", "405")
    assert exact_match("405<|im_end|>\n", "405")
    assert exact_match("405<eos>garbage after the end", "405")
    assert not exact_match("4050", "405")
    assert not exact_match("40", "405")
    assert not exact_match("405 and more", "405")
    assert not exact_match("", "405")
    assert not exact_match("<eos>405", "405")


def test_eval_prompts_render_the_generation_prompt():
    prompts = addition_prompts(TOK, 20, seed=0)
    assert len(prompts) == 20
    for p in prompts:
        assert p["prompt"].startswith("<bos><|user|>What is ")
        assert p["prompt"].endswith("?<|assistant|>")
        assert TOK.decode(p["prompt_ids"]) == p["prompt"]
        a, b = parse_question(p["prompt"])
        assert p["answer"] == str(a + b) and split_of(a, b) == "heldout"


def test_reward_uses_exact_match():
    assert addition_reward(["p", "p", "p"], ["12<eos>", "13", " 12 "],
                           answer=["12", "12", "12"]) == [1.0, 0.0, 1.0]


def test_demo_pipeline_on_the_synthetic_task():
    it = make_sft_iterator(addition_source(500, seed=0), TOK, seq_len=64, batch_size=8,
                           shard_index=0, shard_count=1)
    for _ in range(3):
        batch = next(it)
        check_batch(batch, 64)
        assert (batch["segment_ids"].max(axis=1) >= 2).all()  # rows hold several examples
    assert it.stats.truncated == 0 and it.stats.dropped_too_long == 0
