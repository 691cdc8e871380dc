"""jaxpost/train/reward_model.py: the recipe, held-out eval, training runs (preference
records and batches: tests/data/test_preference.py)."""

import json
import os

import numpy as np
import pytest

from jaxpost.config import ConfigError, to_config_dict, to_dataclass
from jaxpost.data import MalformedRecordError
from jaxpost.data.synthetic import addition_preference_records, parse_question, split_of
from jaxpost.rl import reward_model as rm
from jaxpost.tokenizer import ByteTokenizer
from jaxpost.train.__main__ import load_config
from jaxpost.train.common import load_recipe
from jaxpost.train.reward_model import RewardModelConfig, train

TOK = ByteTokenizer()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                  num_kv_heads=1, head_dim=16)


def small_config(workdir, **data):
    cfg = to_config_dict(RewardModelConfig())
    cfg.workdir = str(workdir)
    cfg.log_every = 1
    cfg.eval_every = 0
    cfg.async_checkpoints = False
    for k, v in TINY_MODEL.items():
        cfg.model[k] = v
    cfg.data.seq_len = 24
    cfg.data.batch_size = 16
    for k, v in data.items():
        cfg.data[k] = v
    cfg.optimizer.lr = 3e-3
    cfg.optimizer.warmup_steps = 0
    cfg.optimizer.schedule = "constant"
    return cfg


def demo_config():
    return load_recipe(os.path.join(ROOT, "configs/rm_demo.py"))


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------- synthetic pairs
def test_synthetic_pairs_chosen_is_the_sum_and_rejected_a_near_miss():
    recs = addition_preference_records(300, seed=0, split="train", max_digits=2)
    assert recs == addition_preference_records(300, seed=0, split="train", max_digits=2)
    for r in recs:
        a, b = parse_question(r["prompt"][0]["content"])
        assert split_of(a, b) == "train" and 0 <= a < 100 and 0 <= b < 100
        assert r["chosen"] == r["answer"] == str(a + b)
        wrong = int(r["rejected"])
        assert wrong != a + b and wrong >= 0
        diff = str(wrong).zfill(3), str(a + b).zfill(3)
        near = abs(wrong - (a + b)) in (1, 2, 10) or sum(x != y for x, y in zip(*diff)) == 1
        assert near, r
    heldout = addition_preference_records(50, seed=0, split="heldout", max_digits=2)
    assert all(split_of(*parse_question(r["prompt"][0]["content"])) == "heldout" for r in heldout)
    with pytest.raises(ValueError, match="split"):
        addition_preference_records(5, split="test")


# ------------------------------------------------------------------------------ records
def test_training_on_a_bad_jsonl_record_fails_at_start_naming_the_field(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    bad = {"prompt": "q", "rejected": "b"}
    path.write_text("\n".join(json.dumps(r) for r in [good, good, bad]))
    cfg = to_dataclass(RewardModelConfig, small_config(tmp_path / "run", source=str(path)))
    with pytest.raises(MalformedRecordError, match="missing 'chosen'"):
        train(cfg)


# ------------------------------------------------------------------------------- config
def test_rm_demo_config_loads_through_the_trainer_registry(tmp_path):
    cfg_dict = demo_config()
    cfg, fn = load_config(cfg_dict)
    assert isinstance(cfg, RewardModelConfig) and fn is train
    cfg_dict.unlock()
    cfg_dict.data.trunction = "drop"
    with pytest.raises(ConfigError, match=r"data\.trunction.*did you mean 'truncation'"):
        load_config(cfg_dict)
    with pytest.raises(ConfigError, match="holdout_fraction"):
        to_dataclass(RewardModelConfig, {"eval": {"holdout_fraction": 1.5}})


# ----------------------------------------------------------------------------- training
def _easy_pairs(path, n=400, seed=0):
    """Chosen responses are lowercase, rejected ones uppercase: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghij"))
    with open(path, "w") as f:
        for _ in range(n):
            word = "".join(rng.choice(letters, 4))
            f.write(json.dumps({"prompt": "say " + "".join(rng.choice(letters, 3)),
                                "chosen": word, "rejected": word.upper()}) + "\n")


@pytest.fixture(scope="module")
def easy_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm_easy")
    data_path = str(tmp / "easy.jsonl")
    _easy_pairs(data_path)
    cfg = small_config(tmp / "run", source=data_path)
    cfg.steps = 30
    cfg.eval_every = 30
    cfg.eval.holdout_fraction = 0.25
    cfg.eval.num_pairs = 64
    cfg.eval.batch_size = 32
    result = train(to_dataclass(RewardModelConfig, cfg))
    return str(tmp / "run"), result


@pytest.mark.slow  # heavy: the not-slow suite has a 5-minute budget
def test_short_training_run_reduces_loss_and_beats_chance_on_held_out_pairs(easy_run):
    workdir, result = easy_run
    metrics = read_metrics(workdir)
    assert metrics[0]["step"] == 1 and abs(metrics[0]["loss"] - np.log(2)) < 1e-3  # zero head
    assert np.mean([m["loss"] for m in metrics[-5:]]) < 0.3
    assert result.eval_metrics["eval_accuracy"] > 0.9
    assert result.eval_metrics["eval_margin"] > 0
    assert {"accuracy", "margin", "reward_chosen", "data_truncated"} <= set(metrics[-1])


@pytest.mark.slow  # heavy: the not-slow suite has a 5-minute budget
def test_trained_reward_model_scores_through_a_reward_spec(easy_run):
    from jaxpost.rl.rewards import RewardSet
    workdir, _ = easy_run
    rs = RewardSet([f"jaxpost.rl.reward_model:from_workdir(workdir={workdir!r})"])
    prompts = [TOK.apply_chat_template([{"role": "user", "content": "say abc"}],
                                       add_generation_prompt=True)] * 4
    total, per = rs(prompts, ["hej", "HEJ", "bad", "BAD"])
    assert per["from_workdir"].shape == (4,)
    assert total[0] > total[1] and total[2] > total[3]


@pytest.mark.slow  # heavy: the not-slow suite has a 5-minute budget
def test_init_from_a_reward_model_workdir_keeps_its_head(easy_run, tmp_path):
    workdir, result = easy_run
    cfg = small_config(tmp_path / "more",
                       source=os.path.join(os.path.dirname(workdir), "easy.jsonl"))
    cfg.model.init_from = workdir
    cfg.steps = 1
    cfg.optimizer.lr = 0.0
    again = train(to_dataclass(RewardModelConfig, cfg))
    np.testing.assert_array_equal(np.asarray(again.state.params["score"]["kernel"]),
                                  np.asarray(result.state.params["score"]["kernel"]))


@pytest.mark.slow  # heavy: the not-slow suite has a 5-minute budget
def test_lora_reward_model_trains_adapters_and_head_and_scores_through_a_reward_spec(
        easy_run, tmp_path):
    import jax
    from jaxpost.peft.lora import has_adapters, strip_adapters
    from jaxpost.rl.rewards import RewardSet
    _, _ = easy_run
    data_path = str(tmp_path / "easy.jsonl")
    _easy_pairs(data_path)
    cfg = small_config(tmp_path / "lora", source=data_path)
    cfg.steps = 30
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    cfg.lora.targets = ("q_proj", "v_proj", "down_proj")
    result = train(to_dataclass(RewardModelConfig, cfg))
    state = result.state
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.trainable)}
    assert any("score" in n for n in names) and any("lora_b" in n for n in names)
    assert not has_adapters(state.frozen) and "score" not in state.frozen
    assert all("lora_" in n or "score" in n for n in names)
    metrics = read_metrics(tmp_path / "lora")
    assert np.mean([m["loss"] for m in metrics[-5:]]) < np.log(2) - 0.1
    assert metrics[0]["params_trainable"] < 0.2 * metrics[0]["params_frozen"]
    # The same backbone without adapters scores differently: the adapters are applied.
    rs = RewardSet([f"jaxpost.rl.reward_model:from_workdir(workdir={str(tmp_path / 'lora')!r})"])
    prompts = [TOK.apply_chat_template([{"role": "user", "content": "say abc"}],
                                       add_generation_prompt=True)] * 2
    total, _ = rs(prompts, ["hej", "HEJ"])
    assert total[0] > total[1]
    assert strip_adapters(state.params).keys() == state.params.keys()


# --------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_reward_model_prefers_correct_sums_on_held_out_problems(tmp_path):
    """The demo model and pipeline, on pairs whose wrong answer is a hundreds slip (the sum
    + 100): learnable in a hundred steps, unlike the near misses of the demo data."""
    from jaxpost.data.synthetic import addition_pairs, addition_prompts, question

    for split, n in (("train", 4000), ("heldout", 200)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for a, b in addition_pairs(n, seed=0, split=split, max_digits=2):
                f.write(json.dumps({"prompt": [{"role": "user", "content": question(a, b)}],
                                    "chosen": str(a + b), "rejected": str(a + b + 100)}) + "\n")
    cfg = demo_config()
    cfg.workdir = str(tmp_path / "run")
    cfg.steps = cfg.eval_every = cfg.checkpoint_every = 150
    cfg.data.source = str(tmp_path / "train.jsonl")
    cfg.eval.source = str(tmp_path / "heldout.jsonl")
    result = train(to_dataclass(RewardModelConfig, cfg))
    assert result.eval_metrics["eval_accuracy"] > 0.9

    reward = rm.from_workdir(workdir=cfg.workdir, batch_size=64)
    prompts = addition_prompts(TOK, 100, seed=1, split="heldout", max_digits=2)
    texts = [p["prompt"] for p in prompts]
    good = reward(texts, [p["answer"] for p in prompts])
    bad = reward(texts, [str(int(p["answer"]) + 100) for p in prompts])
    assert len(good) == len(bad) == 100 and all(isinstance(x, float) for x in good)
    assert np.mean(np.asarray(good) > np.asarray(bad)) > 0.9
