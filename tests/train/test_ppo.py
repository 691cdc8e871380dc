"""The PPO trainer: config checks, rollout advantages against NumPy, 8 devices = 1, end to
end with exact resume (values and the KL controller's beta included); `rloo` GRPO."""

import dataclasses
import json

import chex
import jax
import numpy as np
import pytest

from jaxpost import sharding as sh
from jaxpost.config import ConfigError, to_config_dict
from jaxpost.models import init_params, tiny
from jaxpost.optim import OptimizerConfig, make_optimizer
from jaxpost.rl import value_head as vh
from jaxpost.rl.rollout import build_rows
from jaxpost.train import ppo as ppo_train
from jaxpost.train.__main__ import load_config
from jaxpost.train.ppo import PPOConfig, PPOSection, make_ppo_loss, rollout_advantages
from jaxpost.train.state import TrainState
from jaxpost.train.step import make_train_step, state_shardings
from tests.rl.test_ppo import np_gae

CFG = tiny("llama", num_layers=1, vocab_size=64, hidden_size=32, intermediate_size=64,
           num_heads=2, num_kv_heads=1)
SECTION = PPOSection(prompts_per_step=8, max_prompt_length=5, max_completion_length=4,
                     entropy_coef=0.01, vf_coef=0.5)


# ------------------------------------------------------------------------------ config
def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="num_mini_batches=3 does not divide the 8 rows"):
        PPOSection(prompts_per_step=8, num_mini_batches=3)
    with pytest.raises(ValueError, match="checkpoint_every=3 is not a multiple of the 4"):
        PPOConfig(workdir="w", checkpoint_every=3, steps=8)
    with pytest.raises(ValueError, match="kl_target > 0 .* needs kl_coef > 0"):
        PPOSection(kl_coef=0.0, kl_target=1.0)
    cfg = to_config_dict(PPOConfig(workdir="w", steps=8, checkpoint_every=4))
    assert isinstance(load_config(cfg)[0], PPOConfig)  # `trainer = "ppo"` dispatches here
    cfg.ppo.value_model = "twin"
    with pytest.raises(ConfigError, match="value_model"):
        load_config(cfg)


def test_the_demo_recipe_validates_in_both_arms():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "ppo_gaze_demo.py")
    spec = importlib.util.spec_from_file_location("ppo_gaze_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for predictor in ("", module.GAZE_PREDICTOR):
        cfg = module.get_config()
        cfg.workdir = "w"
        cfg.ppo.gaze_predictor = predictor
        typed = load_config(cfg)[0]
        assert typed.trainer == "ppo" and typed.ppo.gaze_predictor == predictor


def test_rollout_advantages_follow_the_ppo_recipe_step_by_step():
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], np.float32)
    scores = np.array([1.0, -0.5, 2.0], np.float32)
    old, ref = (rng.normal(-2, 0.3, mask.shape).astype(np.float32) for _ in range(2))
    values = rng.normal(size=mask.shape).astype(np.float32)
    p = PPOSection(gamma=0.9, lam=0.8, kl_estimator="k1")
    out = jax.device_get(rollout_advantages(scores, old, ref, values, mask, 0.1, p))
    kl = (old - ref) * mask  # k1
    rewards = -0.1 * kl
    last = mask.sum(1).astype(int) - 1
    rewards[np.arange(3), last] += scores  # the score on each row's last token
    adv, ret = np_gae(rewards, values * mask, mask, 0.9, 0.8)
    valid = adv[mask > 0]
    whitened = (adv - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8) * mask
    chex.assert_trees_all_close(out["rewards"], rewards, atol=1e-6)
    chex.assert_trees_all_close(out["returns"], ret.astype(np.float32), atol=1e-5)
    chex.assert_trees_all_close(out["advantages"], whitened.astype(np.float32), atol=1e-5)
    np.testing.assert_allclose(out["kl_seq"], kl.sum(1).mean(), rtol=1e-5)


# ---------------------------------------------------------------------- 8 devices = 1
def _rollout_batch(seed=0):
    rng = np.random.default_rng(seed)
    n, p, c = 8, SECTION.max_prompt_length, SECTION.max_completion_length
    prompts = [list(rng.integers(1, 64, rng.integers(2, p + 1))) for _ in range(n)]
    batch = build_rows(prompts, rng.integers(1, 64, (n, c)).astype(np.int32),
                       rng.integers(1, c + 1, n), p, 0)
    m = batch["completion_mask"]
    batch["old_logp"] = ((-4 + 0.1 * rng.normal(size=(n, c))) * m).astype(np.float32)
    batch["old_values"] = (0.3 * rng.normal(size=(n, c)) * m).astype(np.float32)
    batch["advantages"] = (rng.normal(size=(n, c)) * m).astype(np.float32)
    batch["returns"] = (rng.normal(size=(n, c)) * m).astype(np.float32)
    return batch


@pytest.mark.slow
def test_ppo_step_on_8_devices_equals_1_device():
    opt = make_optimizer(OptimizerConfig(lr=1e-2), 10)
    loss_fn = make_ppo_loss(CFG, SECTION)
    batch = _rollout_batch()
    results = []
    for devices, mesh_cfg in ((jax.devices()[:1], sh.MeshConfig()),
                              (jax.devices(), sh.MeshConfig(data=2, fsdp=2, tensor=2))):
        mesh = sh.make_mesh(mesh_cfg, devices)
        params = vh.init_value_params(CFG, init_params(CFG, jax.random.key(0)), "shared",
                                      jax.random.key(1), 0.1)  # fresh: the state is donated
        state = TrainState.create(params, opt, seed=0)
        shardings = state_shardings(jax.eval_shape(lambda s: s, state),
                                    vh.value_param_shardings(CFG, mesh), mesh)
        state = jax.device_put(state, shardings)
        placed = sh.shard_batch(batch, mesh)
        step = make_train_step(loss_fn, opt, mesh=mesh, state_sharding=shardings,
                               batch_sharding=jax.tree.map(lambda x: x.sharding, placed),
                               grad_accum_steps=2)
        state, metrics = step(state, placed)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p8, m8) = results
    for k in ("loss", "value_loss", "value_clipfrac", "entropy", "pg_loss", "approx_kl"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert m1["value_loss"] > 0 and 0 < m1["value_clipfrac"] < 1
    chex.assert_trees_all_close(p8, p1, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------- end to end
def _records(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(x) for x in f]


def _small_ppo(workdir, **over):
    cfg = to_config_dict(PPOConfig())
    cfg.workdir = str(workdir)
    cfg.steps = 4
    cfg.log_every = 1
    cfg.checkpoint_every = 2
    for k, v in {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
                 "num_kv_heads": 1, "head_dim": 16}.items():
        cfg.model[k] = v
    cfg.prompts.source = "synthetic:addition:2"
    cfg.prompts.num_records = 64
    cfg.ppo.prompts_per_step = 4
    cfg.ppo.num_generations = 2
    cfg.ppo.max_prompt_length = 24
    cfg.ppo.max_completion_length = 4
    cfg.ppo.num_ppo_epochs = 1
    cfg.ppo.num_mini_batches = 2
    cfg.ppo.kl_coef = 0.2
    cfg.ppo.kl_target = 0.01  # adaptive: beta moves every rollout
    cfg.ppo.kl_horizon = 40.0
    cfg.ppo.value_head_init_std = 0.1
    cfg.optimizer.lr = 3e-3
    cfg.reward_fns = ("tests.train.test_grpo:digit_fraction",)
    cfg.reward_weights = (1.0,)
    for k, v in over.items():
        cfg[k] = v
    return load_config(cfg)[0]


@pytest.mark.slow
def test_ppo_killed_and_resumed_follows_the_straight_run_exactly(tmp_path, monkeypatch):
    keys = ("loss", "value_loss", "value_clipfrac", "explained_variance", "kl", "kl_coef",
            "entropy", "reward_mean", "advantages_mean", "advantages_std", "rollout_value_mean",
            "grad_norm")
    def counted_loss(model_cfg, p):  # one trace of the loss per run: the step compiles once
        return chex.assert_max_traces(make_ppo_loss(model_cfg, p), n=1)

    monkeypatch.setattr(ppo_train, "make_ppo_loss", counted_loss)

    def run(workdir, reward):
        chex.clear_trace_counter()  # each run compiles its step once
        return ppo_train.train(_small_ppo(workdir, steps=6, checkpoint_every=2,
                                          reward_fns=(reward,)))

    straight_result = run(tmp_path / "straight", "tests.train.test_grpo:digit_fraction")
    # The export of a PPO run is its policy (the value head stays in the checkpoint).
    from jaxpost.export import export_run
    from jaxpost.models import from_hf

    exported = export_run(str(tmp_path / "straight"), str(tmp_path / "hf"))
    assert exported.kind == "merged"
    _, hf_params = from_hf(str(tmp_path / "hf"))
    chex.assert_trees_all_close(hf_params, jax.device_get(
        vh.policy_params(straight_result.state.params)))
    # SIGTERM inside the 3rd rollout's reward call: step 4 (two rollouts) is saved and the
    # resumed run replays the 3rd rollout from the same prompts, rng and beta.
    first = run(tmp_path / "killed", "tests.train.test_grpo:preempt_on_call(call=3)")
    assert first.preempted and int(first.state.step) == 4
    resumed_result = run(tmp_path / "killed", "tests.train.test_grpo:digit_fraction")
    assert int(resumed_result.state.step) == 6
    straight, resumed = (_records(tmp_path / d) for d in ("straight", "killed"))
    assert [x["step"] for x in resumed] == [1, 2, 3, 4, 5, 6]
    for key in keys + ("value_mean", "pg_loss", "approx_kl", "ratio_mean", "kl_seq",
                       "non_score_reward", "returns_mean"):
        assert key in straight[0], key
    # The controller moved beta at each rollout, and the policy left the reference.
    betas = [x["kl_coef"] for x in straight[::2]]
    assert betas[0] == 0.2 and len(set(betas)) == 3, betas
    assert straight[0]["kl"] == 0.0 and straight[-1]["kl"] != 0.0
    assert straight[0]["ratio_mean"] == 1.0  # the first mini-batch: the rollout policy
    for a, b in zip(straight, resumed):
        for k in keys:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {a['step']} {k}")


# --------------------------------------------------------------------------- rloo GRPO
@pytest.mark.slow
def test_rloo_grpo_runs_end_to_end_with_the_leave_one_out_baseline(tmp_path, monkeypatch):
    from jaxpost.rl.advantages import estimate_advantages
    from jaxpost.train import grpo
    from tests.train.test_grpo import _small_grpo

    seen = []

    def spy(name, rewards, mask, **kw):
        adv, stats = estimate_advantages(name, rewards, mask, **kw)
        seen.append((name, np.asarray(rewards), np.asarray(adv)))
        return adv, stats

    monkeypatch.setattr(grpo, "estimate_advantages", spy)
    cfg = _small_grpo(tmp_path, steps=2)
    cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(
        cfg.grpo, advantage_estimator="rloo", scale_rewards="none", num_iterations=1))
    result = grpo.train(cfg)
    assert int(result.state.step) == 2
    lines = _records(tmp_path)
    assert all(np.isfinite(x["loss"]) for x in lines)
    assert [s[0] for s in seen] == ["rloo", "rloo"]
    for _, r, adv in seen:  # r_i - mean of the other 3 of its group of 4
        g = r.reshape(-1, 4)
        want = g - (g.sum(1, keepdims=True) - g) / 3
        np.testing.assert_allclose(adv, want.reshape(-1), rtol=1e-5, atol=1e-6)
        assert np.any(adv != 0)


# ---------------------------------------------------------------------------- GazeDistrib
def test_gaze_distributed_scores_sum_to_the_score_and_favour_long_rare_words():
    from jaxpost.data.mention import TOKENIZER_DIR
    from jaxpost.rl.gaze import PsycholinguisticPredictor
    from jaxpost.tokenizer import load_tokenizer

    tok = load_tokenizer(TOKENIZER_DIR)
    texts = ["the old elephant sat near the violin.", "a big falcon hid."]
    ids = [tok.encode(t) for t in texts]
    width = max(map(len, ids)) + 2
    completion = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.float32)
    for i, row in enumerate(ids):
        completion[i, :len(row)] = row
        mask[i, :len(row)] = 1
    scores = np.array([2.0, -1.0], np.float32)
    p = PPOSection(gaze_predictor="psycholinguistic", gaze_standardize=True)
    out = ppo_train.gaze_score_tokens(PsycholinguisticPredictor(), tok, completion, scores,
                                      mask, p)
    chex.assert_shape(out, mask.shape)
    np.testing.assert_allclose(out.sum(1), scores, rtol=1e-5)
    np.testing.assert_array_equal(out[mask == 0], 0.0)
    words = [tok.decode([t]).strip() for t in ids[0]]
    share = dict(zip(words, out[0, :len(ids[0])]))
    assert share["elephant"] > max(share["the"], share["old"], share["sat"]), share
