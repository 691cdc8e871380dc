"""The mention task: records, splits, its tokenizer, its reward, its recipes."""

import importlib.util
import os

import numpy as np
import pytest

from jaxpost.data import mention, open_source
from jaxpost.rl.mention import mention_reward, mentioned
from jaxpost.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_records_keep_asked_entities_at_the_given_rate_and_splits_are_disjoint():
    recs = mention.make_mention_records(2000, seed=0, keep=0.5)
    rate = np.mean([mentioned(r["messages"][1]["content"], r["entities"]) for r in recs])
    # keep 0.5 per entity; another entity drawn never equals an asked one.
    assert 0.45 < rate < 0.55
    assert mention.make_mention_records(5, seed=3) == mention.make_mention_records(5, seed=3)
    pairs = {s: {r["entities"] for r in mention.make_mention_records(500, 1, s)}
             for s in mention.SPLITS}
    assert pairs["train"] and pairs["heldout"] and not pairs["train"] & pairs["heldout"]
    src = open_source("synthetic:mention:1.0", num_records=4, schema="prompt")
    assert all(mentioned(r["messages"][1]["content"], r["entities"]) == 1.0 for r in src)
    with pytest.raises(ValueError, match="synthetic:mention:KEEP"):
        mention.parse_spec("synthetic:mention:2")


def test_mention_tokenizer_has_one_token_per_task_word(tmp_path):
    tok = load_tokenizer(mention.TOKENIZER_DIR)
    for w in mention.task_words():  # with its leading space, or at a line start
        assert min(len(tok.encode(" " + w)), len(tok.encode(w))) == 1, w
    assert tok.eos_id in tok.special_ids and tok.chat_template
    # The committed files are what the function writes.
    mention.write_mention_tokenizer(tmp_path)
    fresh = load_tokenizer(str(tmp_path))
    text = "Mention falcon and meadow. the old falcon sat near the meadow."
    assert fresh.encode(text) == tok.encode(text)


def test_mention_reward_counts_asked_words_once_case_and_punctuation_free():
    got = mention_reward(["p"] * 4, ["the Falcon sat near the meadow.", "falcon falcon",
                                     "the falconry", ""], entities=["falcon,meadow"] * 4)
    assert got == [1.0, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="names no word"):
        mentioned("x", " , ")


@pytest.mark.parametrize("name", ["sft_mention", "grpo_gaze_demo", "gaze_predictor"])
def test_gaze_recipes_load(name):
    from jaxpost.train.__main__ import load_config
    from jaxpost.train.common import load_recipe

    cfg, _ = load_config(load_recipe(os.path.join(ROOT, "configs", f"{name}.py")))
    for key in ("workdir", "seed", "steps", "log_every", "checkpoint_every"):
        assert hasattr(cfg, key)


def test_demo_script_summary_of_runs():
    spec = importlib.util.spec_from_file_location(
        "grpo_gaze_demo_script", os.path.join(ROOT, "scripts", "grpo_gaze_demo.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    np.testing.assert_allclose(script._smooth(np.array([0.0, 1.0, 1.0, 1.0]), 2),
                               [0.0, 0.5, 1.0, 1.0])
    runs = {"a": {0: {"rewards": [0.1, 0.9], "wall_s": 1.0, "steps_to_threshold": 2,
                      "final_reward": 0.9},
                  1: {"rewards": [0.3, 0.5], "wall_s": 3.0, "steps_to_threshold": None,
                      "final_reward": 0.5}}}
    t = script.summarise(runs, 0.8, 1)["a"]
    assert t["reached"] == 1 and t["steps_to_threshold_mean"] == 2.0
    np.testing.assert_allclose([t["final_reward_mean"], t["final_reward_std"]], [0.7, 0.2])
    np.testing.assert_allclose(t["initial_reward_mean"], 0.2)
