"""Drift metrics: exact on scripted verdicts and completions; the judges on known strings."""

import json
import math

import numpy as np
import pytest

from jaxpost.data import alignment as A
from jaxpost.eval import drift as D
from jaxpost.sampling import SampleOutput
from jaxpost.tokenizer import load_tokenizer


def items(*spec):
    """[(category, unsafe, n)] -> one item per prompt."""
    return [{"category": c, "unsafe": u} for c, u, n in spec for _ in range(n)]


BEFORE_ITEMS = items(("weapons", True, 4), ("poison", True, 2), ("cooking", False, 3))


def test_drift_metrics_count_per_category_and_overall():
    m = D.drift_metrics(BEFORE_ITEMS, [1, 1, 0, 1, 0, 0, 0, 1, 0])
    assert m["categories"]["weapons"] == {"unsafe": True, "num": 4, "refusals": 3,
                                          "refusal_rate": 0.75, "answer_rate": 0.25}
    assert m["categories"]["poison"]["refusal_rate"] == 0.0
    assert m["categories"]["cooking"]["answer_rate"] == pytest.approx(2 / 3)
    assert m["refusal_rate"] == 0.5  # 3 of the 6 unsafe prompts
    assert m["answer_rate"] == pytest.approx(2 / 3)  # 2 of the 3 safe prompts
    assert (m["num_unsafe"], m["num_safe"]) == (6, 3)
    matched = D.drift_metrics(BEFORE_ITEMS, [0] * 9, matched=[0, 0, 0, 0, 0, 0, 1, 1, 0])
    assert matched["reference_rate"] == pytest.approx(2 / 3)  # over safe prompts only
    assert matched["categories"]["cooking"]["reference_rate"] == pytest.approx(2 / 3)
    assert "reference_rate" not in m and "matches" not in m["categories"]["weapons"]
    only_unsafe = D.drift_metrics(items(("weapons", True, 2)), [True, False])
    assert math.isnan(only_unsafe["answer_rate"]) and only_unsafe["refusal_rate"] == 0.5


def test_drift_metrics_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="9 prompts but 2 verdicts"):
        D.drift_metrics(BEFORE_ITEMS, [True, False])
    with pytest.raises(ValueError, match="'weapons' has both safe and unsafe"):
        D.drift_metrics([{"category": "weapons", "unsafe": True},
                         {"category": "weapons", "unsafe": False}], [True, True])


def test_compare_drift_drops_and_table():
    before = D.drift_metrics(BEFORE_ITEMS, [1, 1, 1, 1, 1, 1, 0, 0, 0])
    after = D.drift_metrics(BEFORE_ITEMS, [1, 0, 0, 0, 1, 1, 0, 1, 1])
    r = D.compare_drift(before, after)
    assert r["refusal_drop"] == pytest.approx(1 - 3 / 6)
    assert r["answer_drop"] == pytest.approx(1 - 1 / 3)
    assert r["categories"]["weapons"] == {"unsafe": True, "metric": "refusal_rate",
                                          "before": 1.0, "after": 0.25, "drop": 0.75}
    assert r["categories"]["poison"]["drop"] == 0.0
    assert r["categories"]["cooking"]["metric"] == "answer_rate"
    table = D.drift_table(r).splitlines()
    assert table[2] == "| weapons | unsafe | refusal_rate | 100.0% | 25.0% | 75.0% |"
    assert table[-1] == "| **all** | safe | answer_rate | 100.0% | 33.3% | 66.7% |"


@pytest.mark.parametrize("text, refused", [
    ("I'm sorry, but I can't help with that.<eos>", True),
    ("I\u2019M SORRY, no.", True),  # typographic apostrophe, upper case
    ("i cannot do that", True),
    ("As an AI, I must decline.", True),
    ("Sure! Mix it, cook it gently and serve pasta warm.<eos>", False),
    ("Sure!<eos>I'm sorry", False),  # after EOS is not the reply
    ("Sure!<|user|>I can't", False),  # nor is a new turn
    ("405", False),
    ("", False),
])
def test_phrase_judge_on_known_strings(text, refused):
    assert D.PhraseJudge()([""], [text]) == [refused]


def test_phrase_judge_max_chars_judges_only_the_opening():
    text = "Sure, here it is. I can't promise it is tasty."
    assert D.PhraseJudge().is_refusal(text)
    assert not D.PhraseJudge(max_chars=12).is_refusal(text)
    with pytest.raises(ValueError, match="non-empty phrases"):
        D.PhraseJudge(phrases=("",))


def test_reward_model_judge_thresholds_scores_of_cut_replies():
    seen = {}

    def scorer(prompts, completions):
        seen["completions"] = completions
        return [{"no": 2.0, "yes": -1.0, "meh": 0.5}[c] for c in completions]

    judge = D.RewardModelJudge(scorer, threshold=1.0)
    assert judge(["a", "b", "c"], ["no<eos>x", "yes", "meh<|user|>"]) == [True, False, False]
    assert seen["completions"] == ["no", "yes", "meh"]
    assert D.RewardModelJudge(scorer)(["a"], ["meh"]) == [True]
    with pytest.raises(ValueError, match="2 scores for 1 completions"):
        D.RewardModelJudge(lambda p, c: [1.0, 2.0])(["a"], ["b"])


def scripted_judge(prompts, completions):
    """A test judge: refusal iff the completion says REFUSE (loaded by spec below)."""
    return ["REFUSE" in c for c in completions]


def test_make_judge_from_config_values():
    assert isinstance(D.make_judge("phrases"), D.PhraseJudge)
    judge = D.make_judge("tests.eval.test_drift:scripted_judge")
    assert judge(["p", "q"], ["REFUSE", "ok"]) == [True, False]


class ScriptedSampler:
    """Stands in for `jaxpost.sampling.Sampler`: the completion of a prompt is looked up
    by the prompt's text; records each call's prompt width."""

    def __init__(self, tokenizer, replies, max_new_tokens):
        self.tok, self.replies, self.n = tokenizer, replies, max_new_tokens
        self.widths = []

    def __call__(self, params, prompts, lengths, rng, sampling):
        del params, rng, sampling
        self.widths.append(prompts.shape[1])
        rows = [self.tok.encode(self.replies[self.tok.decode(p[:n].tolist())])
                [:self.n] for p, n in zip(np.asarray(prompts), np.asarray(lengths))]
        tokens = np.zeros((len(rows), self.n), np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        return SampleOutput(tokens=tokens, logprobs=np.zeros(tokens.shape, np.float32),
                            lengths=np.asarray([len(r) for r in rows], np.int32),
                            truncated=np.zeros(len(rows), bool))


def test_drift_eval_scripted_completions_before_and_after(tmp_path):
    tok = load_tokenizer("byte")
    prompts = A.drift_prompts(3, seed=0, categories=("weapons", "cooking"))
    rendered = [tok.apply_chat_template(p["messages"], add_generation_prompt=True)
                for p in prompts]
    # before: all weapons refused, no cooking; after: one weapons prompt refused, and
    # one cooking prompt (over-refusal).
    before = dict(zip(rendered, ["REFUSE<eos>"] * 3 + ["Sure<eos>"] * 3))
    after = dict(zip(rendered, ["REFUSE<eos>", "ok<eos>", "ok",
                                prompts[3]["reference"] + "<eos>", "REFUSE", "x"]))
    results = []
    for replies in (before, after):
        sampler = ScriptedSampler(tok, replies, max_new_tokens=64)
        ev = D.DriftEval(sampler, tok, prompts, scripted_judge, max_new_tokens=64,
                         batch_size=4)
        results.append(ev(params=None))
        assert len(set(sampler.widths)) == 1  # one prompt width: one compilation
    (m0, _), (m1, s1) = results
    assert (m0["refusal_rate"], m0["answer_rate"]) == (1.0, 1.0)
    assert m1["refusal_rate"] == pytest.approx(1 / 3)
    assert m1["answer_rate"] == pytest.approx(2 / 3)
    assert (m0["reference_rate"], m1["reference_rate"]) == (0.0, pytest.approx(1 / 3))
    assert [s["refused"] for s in s1] == [True, False, False, False, True, False]
    assert s1[1]["completion"] == "ok" and s1[1]["category"] == "weapons"
    report = D.compare_drift(m0, m1)
    path = D.write_drift_report(str(tmp_path), report, samples_after=s1)
    assert path == str(tmp_path / "drift.json")
    stored = json.loads((tmp_path / "drift.json").read_text())
    assert stored["refusal_drop"] == pytest.approx(2 / 3)
    assert stored["categories"]["cooking"] == {"unsafe": False, "metric": "answer_rate",
                                              "before": 1.0, "after": pytest.approx(2 / 3),
                                              "drop": pytest.approx(1 / 3)}
    assert stored["after"]["categories"]["weapons"]["refusals"] == 1
    assert stored["samples_after"][4]["prompt"] == prompts[4]["messages"][0]["content"]


def test_drift_report_json_writes_nan_as_null(tmp_path):
    m = D.drift_metrics(items(("weapons", True, 1)), [True])
    D.write_drift_report(str(tmp_path / "d.json"), D.compare_drift(m, m))
    stored = json.loads((tmp_path / "d.json").read_text())
    assert stored["answer_drop"] is None and stored["refusal_drop"] == 0.0


@pytest.mark.slow  # ~7 s CPU: compiles a reward model's scorer
def test_reward_model_judge_from_a_checkpoint_thresholds_its_scores(tmp_path):
    import dataclasses
    import os

    import jax
    import jax.numpy as jnp

    from jaxpost.checkpoint import Checkpointer
    from jaxpost.data.preference import open_preference_source, preference_problem
    from jaxpost.models import init_params, tiny
    from jaxpost.rl import reward_model as rm

    tok = load_tokenizer("byte")
    cfg = tiny("llama", num_layers=1, vocab_size=tok.vocab_size, hidden_size=32, head_dim=8,
               intermediate_size=64)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"model": init_params(cfg, k1), "score": rm.init_head(cfg, k2, std=0.5)}
    metadata = {"config": {"trainer": "reward_model", "data": {"tokenizer": "byte",
                                                                "seq_len": 64}},
                "model": dataclasses.asdict(cfg), "reward_model": {"pooling": "last_token"}}
    with Checkpointer(os.path.join(tmp_path, "checkpoints"), async_save=False) as ckpt:
        ckpt.save(1, {"params": params, "step": jnp.int32(1)}, metadata=metadata)
    prompts = [tok.apply_chat_template(p["messages"], add_generation_prompt=True)
               for p in A.drift_prompts(1, seed=0)]
    replies = ["I can't help with that.", "Sure!", "I'm sorry", "405", "Sure! Offer help", "34"]
    assert len(replies) == len(prompts)  # one held-out prompt per category
    scores = rm.RewardModelReward(str(tmp_path), batch_size=4)(prompts, replies)
    threshold = float(np.median(scores))
    judge = D.make_judge(f"jaxpost.eval.drift:reward_model_judge(workdir={str(tmp_path)!r}, "
                         f"threshold={threshold!r}, batch_size=4)")
    assert judge(prompts, [r + "<eos>junk" for r in replies]) == [s > threshold for s in scores]
    # The refusal detector's training pairs come from the preference source spec.
    src = open_preference_source("synthetic:alignment:weapons", num_records=3)
    assert len(src) == 3 and all(preference_problem(src[i]) is None for i in range(3))
