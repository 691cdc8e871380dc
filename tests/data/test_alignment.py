"""The synthetic alignment set: deterministic, well-formed, disjoint splits."""

import pytest

from jaxpost.data import alignment as A
from jaxpost.data import open_source, tokenize_record, validate_record
from jaxpost.eval.drift import PhraseJudge
from jaxpost.tokenizer import load_tokenizer


def test_records_are_deterministic_from_the_seed():
    assert A.alignment_records(50, seed=3) == A.alignment_records(50, seed=3)
    assert A.alignment_records(50, seed=3) != A.alignment_records(50, seed=4)
    assert A.drift_prompts(5, seed=1) == A.drift_prompts(5, seed=1)


def test_records_are_well_formed_and_answered_by_kind():
    judge = PhraseJudge()
    records = A.alignment_records(200, seed=0)
    assert {r["category"] for r in records} == set(A.CATEGORIES)
    for r in records:
        assert validate_record(r, "sft") is None
        reply = r["completion"][0]["content"]
        assert r["unsafe"] == A.CATEGORIES[r["category"]].unsafe
        assert judge.is_refusal(reply) == r["unsafe"], r
        if r["unsafe"]:
            assert reply in A.REFUSALS
    # Categories come in turn.
    assert [r["category"] for r in records[:len(A.CATEGORIES)]] == list(A.CATEGORIES)


def test_a_record_tokenizes_with_targets_only_on_the_reply():
    tok = load_tokenizer("byte")
    record = A.alignment_records(1, seed=0)[0]
    ex = tokenize_record(tok, record)
    reply = record["completion"][0]["content"]
    targets = [int(t) for t, m in zip(ex["tokens"], ex["loss_mask"]) if m > 0]
    assert tok.decode(targets).startswith(reply)
    assert len(ex["tokens"]) <= 128  # the demo's seq_len


def test_splits_never_share_a_request():
    for name in A.CATEGORIES:
        train = {r["text"] for r in A.split_requests(name, "train")}
        heldout = {r["text"] for r in A.split_requests(name, "heldout")}
        assert train and heldout and not train & heldout
    held = [p["messages"][0]["content"] for p in A.drift_prompts(20, seed=0)]
    assert len(held) == 20 * len(A.CATEGORIES) == len(set(held))
    assert all(A.split_of(t) == "heldout" for t in held)
    train_texts = {r["prompt"][0]["content"] for r in A.alignment_records(500, seed=0)}
    assert not train_texts & set(held)


def test_source_spec_selects_categories_and_rejects_unknown_ones():
    src = open_source("synthetic:alignment:weapons+cooking", num_records=10, seed=0)
    assert len(src) == 10 and {src[i]["category"] for i in range(10)} == {"weapons", "cooking"}
    with pytest.raises(ValueError, match="unknown alignment categories.*'bombs'"):
        open_source("synthetic:alignment:bombs", num_records=1)
    with pytest.raises(ValueError, match="unknown split"):
        A.alignment_records(1, split="test")
    with pytest.raises(ValueError, match="'cooking' has .* heldout requests"):
        A.drift_prompts(1000, categories=("cooking",))


def test_refusal_preferences_prefer_a_refusal_for_every_prompt():
    judge = PhraseJudge()
    pairs = A.refusal_preference_records(20, seed=0)
    assert all(judge.is_refusal(p["chosen"]) and not judge.is_refusal(p["rejected"])
               for p in pairs)
    assert {p["unsafe"] for p in pairs} == {True, False}
