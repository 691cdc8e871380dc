"""jaxpost/data/facts.py: the made-up fact-recall task and its mixture with addition."""

import pytest

from jaxpost import data
from jaxpost.data import facts, synthetic
from jaxpost.tokenizer import load_tokenizer


def test_the_fact_table_is_fixed_whatever_the_run_seed():
    table = facts.fact_table(20)
    assert len(table) == 20 * len(facts.ATTRIBUTES)
    assert len({f.entity for f in table}) == 20
    assert table == facts.fact_table(20)
    assert facts.fact_table(30)[:len(table)] == table  # more entities extend the world
    for f in table:
        assert f.value in facts.ATTRIBUTES[f.attribute]
    # Two seeds: other orders, the same facts.
    a, b = (facts.make_fact_records(60, seed=s, num_entities=20) for s in (0, 1))
    assert a != b
    key = lambda r: (r["messages"][0]["content"], r["answer"])
    assert sorted(map(key, a)) == sorted(map(key, b))
    truth = {f.question: f.value for f in table}
    assert all(truth[r["messages"][0]["content"]] == r["messages"][1]["content"] == r["answer"]
               for r in a)


def test_mixture_spec_alternates_facts_and_addition_of_the_split():
    src = data.open_source("synthetic:facts:10+addition:2", num_records=7, seed=3,
                           split="heldout")
    recs = [src[i] for i in range(len(src))]
    assert len(recs) == 7
    questions = [r["messages"][0]["content"] for r in recs]
    assert all(q.startswith("What is the ") for q in questions[::2])
    sums = [synthetic.parse_question(q) for q in questions[1::2]]
    assert all(s is not None and synthetic.split_of(*s) == "heldout" for s in sums)
    assert all(r["answer"] == str(a + b) for r, (a, b) in zip(recs[1::2], sums))
    only = data.open_source("synthetic:facts", num_records=5)
    assert all(only[i]["messages"][0]["content"].startswith("What is the ") for i in range(5))


def test_fact_prompts_cover_the_table_and_bad_specs_are_named():
    tok = load_tokenizer("byte")
    prompts = facts.fact_prompts(tok, 5)
    assert len(prompts) == 15
    assert prompts[0]["prompt"].endswith("<|assistant|>")
    assert tok.decode(prompts[0]["prompt_ids"]) == prompts[0]["prompt"]
    assert synthetic.exact_match(prompts[0]["answer"] + "<eos>", prompts[0]["answer"])
    assert facts.parse_spec("synthetic:facts:7+addition") == facts.FactsSpec(7, 3)
    with pytest.raises(ValueError, match="synthetic:facts:0"):
        facts.parse_spec("synthetic:facts:0")
    with pytest.raises(ValueError, match="unknown facts source"):
        data.open_source("synthetic:facts+subtraction", num_records=4)
