"""The GRPO trainer: first-iteration ratio, sharding equality, end to end (row layout:
tests/rl/test_rollout.py)."""

import dataclasses
import json
import os
import signal

import jax
import numpy as np
import pytest

from jaxpost import sharding as sh
from jaxpost.config import to_config_dict
from jaxpost.models import init_params, tiny
from jaxpost.optim import OptimizerConfig, make_optimizer
from jaxpost.rl.rewards import RewardFunctionError
from jaxpost.rl.rollout import build_rows
from jaxpost.train.grpo import GRPOConfig, GRPOSection, make_grpo_loss, train
from jaxpost.train.state import TrainState
from jaxpost.train.step import make_train_step, state_shardings

CFG = tiny("llama", num_layers=1, vocab_size=64)
G = GRPOSection(num_generations=4, prompts_per_step=2, max_prompt_length=5,
                max_completion_length=4, beta=0.04, num_iterations=2, loss_type="grpo")


def _rollout_batch(seed=0, first=1.0):
    rng = np.random.default_rng(seed)
    n, p, c = 8, G.max_prompt_length, G.max_completion_length
    prompts = [list(rng.integers(1, 64, rng.integers(2, p + 1))) for _ in range(n)]
    lengths = rng.integers(1, c + 1, n)
    batch = build_rows(prompts, rng.integers(1, 64, (n, c)).astype(np.int32), lengths, p, 0)
    batch["advantages"] = (rng.normal(size=(n, 1)) * batch["completion_mask"]).astype(np.float32)
    batch["old_logp"] = (-3 + 0.1 * rng.normal(size=(n, c))).astype(np.float32)
    batch["ref_logp"] = (-3 + 0.1 * rng.normal(size=(n, c))).astype(np.float32)
    batch["first_iteration"] = np.full((n,), first, np.float32)
    return batch


def test_first_iteration_ratio_is_exactly_one_and_later_ones_use_old_logprobs():
    params = init_params(CFG, jax.random.key(0))
    loss_fn = jax.jit(make_grpo_loss(CFG, G))
    _, _, aux = loss_fn(params, _rollout_batch(first=1.0), None)
    s, w = aux["ratio_mean"]
    assert float(s) / float(w) == 1.0
    assert float(aux["clip_ratio/region_mean"][0]) == 0.0
    _, _, aux = loss_fn(params, _rollout_batch(first=0.0), None)
    s, w = aux["ratio_mean"]
    assert abs(float(s) / float(w) - 1.0) > 1e-3  # stored old log-probs differ from the policy
    assert float(aux["kl"][0]) > 0


@pytest.mark.slow  # heavy: the not-slow suite has a 5-minute budget
def test_grpo_step_on_8_devices_equals_1_device():
    opt = make_optimizer(OptimizerConfig(lr=1e-2), 10)
    loss_fn = make_grpo_loss(CFG, G)
    batch = _rollout_batch()
    results = []
    for devices, mesh_cfg in ((jax.devices()[:1], sh.MeshConfig()),
                              (jax.devices(), sh.MeshConfig(data=2, fsdp=2, tensor=2))):
        mesh = sh.make_mesh(mesh_cfg, devices)
        state = TrainState.create(init_params(CFG, jax.random.key(0)), opt, seed=0)
        shardings = state_shardings(jax.eval_shape(lambda: state), sh.param_shardings(CFG, mesh), mesh)
        state = jax.device_put(state, shardings)
        placed = sh.shard_batch(batch, mesh)
        step = make_train_step(loss_fn, opt, mesh=mesh, state_sharding=shardings,
                               batch_sharding=jax.tree.map(lambda x: x.sharding, placed),
                               grad_accum_steps=2)
        state, metrics = step(state, placed)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p8, m8) = results
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m1["kl"], m8["kl"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
    # Adam divides each gradient entry by its own magnitude, so an entry near 0 (the
    # bias-corrected KL cancels some) turns float32 reduction-order noise into up to
    # ~0.2% of one lr=1e-2 update: atol 3e-5 allows that, not a wrong update.
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-4)


def _small_grpo(workdir, **over):
    cfg = to_config_dict(GRPOConfig())
    cfg.workdir = str(workdir)
    cfg.steps = 4
    cfg.log_every = 1
    cfg.checkpoint_every = 2
    for k, v in dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                     num_kv_heads=1, head_dim=16).items():
        cfg.model[k] = v
    cfg.prompts.source = "synthetic:addition:2"
    cfg.prompts.num_records = 64
    cfg.grpo.num_generations = 4
    cfg.grpo.prompts_per_step = 2
    cfg.grpo.max_prompt_length = 24
    cfg.grpo.max_completion_length = 4
    cfg.grpo.beta = 0.04
    cfg.grpo.num_iterations = 2
    cfg.optimizer.lr = 3e-3  # large enough that the policy measurably leaves the reference
    # A random model never answers right: the digit fraction gives the groups a spread.
    cfg.reward_fns = ("jaxpost.rl.rewards:exact_answer", "jaxpost.rl.rewards:format_reward",
                      "tests.train.test_grpo:digit_fraction")
    cfg.reward_weights = (1.0, 0.5, 1.0)
    for k, v in over.items():
        cfg[k] = v
    from jaxpost.train.__main__ import load_config
    return load_config(cfg)[0]


@pytest.mark.slow
def test_grpo_trains_logs_reward_metrics_and_resumes(tmp_path):
    result = train(_small_grpo(tmp_path))
    assert int(result.state.step) == 4
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    for key in ("loss", "reward_mean", "rewards/exact_answer/mean", "rewards/format_reward/mean",
                "frac_reward_zero_std", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "entropy", "completion_length_mean", "completion_length_max", "truncation_rate",
                "rollout_tokens_per_s", "time_rollout_s", "time_reference_s"):
        assert key in lines[0], key
    for line in lines:  # num_iterations=2: a fresh rollout batch at every odd step
        assert (line["ratio_mean"] == 1.0) == (line["step"] % 2 == 1), line
        assert np.isfinite(line["loss"]) and line["kl"] >= 0
    assert lines[0]["kl"] == 0.0  # the first update: the policy is still the reference
    assert lines[-1]["kl"] > 0.0  # ... it has moved away from it since
    resumed = train(_small_grpo(tmp_path, steps=6))
    assert int(resumed.state.step) == 6
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines][-2:] == [5, 6]
    assert lines[-1]["kl"] > 0.0  # the anchor is the run's start, not the resumed policy


def digit_fraction(prompts, completions, **columns):
    """Fraction of digits in each completion: a reward with a spread on random models."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def preempt_on_call(call: int = 2):
    """Reward factory for the resume test: sends this process SIGTERM (a preemptible TPU
    VM's notice) during its `call`-th call; scores like `digit_fraction`."""
    calls = [0]

    def reward(prompts, completions, **columns):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return digit_fraction(prompts, completions)
    return reward


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_grpo_with_kl_preempted_and_resumed_logs_the_same_loss_and_kl_as_a_straight_run(
        tmp_path, lora_rank):
    keys = ("loss", "kl", "reward_mean", "entropy", "grad_norm")

    def run(workdir, reward):
        cfg = _small_grpo(workdir, steps=5, reward_fns=(reward,), reward_weights=(1.0,))
        cfg = dataclasses.replace(
            cfg, grpo=dataclasses.replace(cfg.grpo, num_iterations=1),
            lora=dataclasses.replace(cfg.lora, rank=lora_rank, targets=("q_proj", "v_proj")))
        return train(cfg)

    run(tmp_path / "straight", "tests.train.test_grpo:digit_fraction")
    # SIGTERM inside the 3rd rollout's reward call interrupts that host wait: step 2 is
    # saved and the resumed run replays the 3rd rollout from the same prompts and rng.
    first = run(tmp_path / "killed", "tests.train.test_grpo:preempt_on_call(call=3)")
    assert first.preempted and int(first.state.step) == 2
    run(tmp_path / "killed", "tests.train.test_grpo:digit_fraction")  # resumes at step 3
    straight, resumed = ([json.loads(x) for x in open(tmp_path / d / "metrics.jsonl")]
                         for d in ("straight", "killed"))
    assert [x["step"] for x in resumed] == [1, 2, 3, 4, 5]
    assert straight[-1]["kl"] > 0
    for a, b in zip(straight, resumed):
        for k in keys:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {a['step']} {k}")


@pytest.mark.slow
def test_a_reward_function_that_raises_stops_the_run_naming_it(tmp_path):
    cfg = _small_grpo(tmp_path, reward_fns=("tests.train.test_grpo:broken_reward",),
                      reward_weights=(1.0,))
    with pytest.raises(RewardFunctionError, match="broken_reward"):
        train(cfg)


def broken_reward(prompts, completions, **columns):
    """A reward function with a bug, for the test above."""
    return [1.0 / 0.0 if i == 3 else 0.0 for i in range(len(completions))]


# ------------------------------------------------- configurations that cannot learn
def test_one_generation_per_prompt_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"num_generations must be >= 2, got 1: .*advantage 0"):
        GRPOSection(num_generations=1)
    from jaxpost.config import ConfigError
    from jaxpost.train.__main__ import load_config
    cfg = to_config_dict(GRPOConfig(workdir="w"))
    cfg.grpo.num_generations = 1
    with pytest.raises(ConfigError, match=r"^config\.grpo: num_generations must be >= 2"):
        load_config(cfg)


def _rollout_task(tmp_path, reward, **grpo):
    """A GRPOTask on a random tiny model (one device) and a state-like object."""
    import types

    from jaxpost.train.common import setup
    from jaxpost.train.grpo import GRPOTask

    cfg = _small_grpo(tmp_path, reward_fns=(reward,), reward_weights=(1.0,))
    cfg = dataclasses.replace(
        cfg, mesh=dataclasses.replace(cfg.mesh, num_devices=1),
        grpo=dataclasses.replace(cfg.grpo, beta=0.0, num_iterations=1, **grpo))
    tokenizer, mesh, model_cfg = setup(cfg.model, cfg.mesh, cfg.prompts.tokenizer)
    task = GRPOTask(cfg, model_cfg, tokenizer, mesh)
    state = types.SimpleNamespace(params=init_params(model_cfg, jax.random.key(0)),
                                  rng=jax.random.key_data(jax.random.key(0)))
    return task, state


def no_reward(prompts, completions, **columns):
    """A reward that applies to nothing: None for half the rows, NaN for the rest."""
    return [None if i % 2 else float("nan") for i in range(len(completions))]


def constant_reward(prompts, completions, **columns):
    return [1.0] * len(completions)


def test_a_rollout_batch_without_any_reward_is_an_error_naming_the_functions(tmp_path):
    task, state = _rollout_task(tmp_path, "tests.train.test_grpo:no_reward")
    with pytest.raises(RewardFunctionError, match=r"no completion of this batch of 8 has a "
                                                  r"reward.*no_reward 8/8"):
        task.next_batch(state)


def test_rollouts_without_reward_spread_warn_every_n_batches(tmp_path, caplog):
    task, state = _rollout_task(tmp_path, "tests.train.test_grpo:constant_reward",
                                warn_zero_std_rollouts=2)
    warnings = []
    for _ in range(4):
        caplog.clear()
        with caplog.at_level("WARNING", logger="jaxpost.train.grpo"):
            _, metrics = task.next_batch(state)
        assert metrics["frac_reward_zero_std"] == 1.0
        warnings.append([r.getMessage() for r in caplog.records])
    assert [len(w) for w in warnings] == [0, 1, 0, 1]
    assert "the last 2 rollout batches had no reward spread" in warnings[1][0]
    assert "constant_reward 1" in warnings[1][0] and "the last 4" in warnings[3][0]


def test_prompts_skip_malformed_skips_bad_jsonl_lines_instead_of_failing(tmp_path):
    from jaxpost.data import MalformedRecordError
    from jaxpost.train.common import setup
    from jaxpost.train.grpo import GRPOTask

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n'
                       '{"prompt": "2+2=", "answer": "4"}\n')
    cfg = _small_grpo(tmp_path)
    cfg = dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, source=str(prompts)),
                              grpo=dataclasses.replace(cfg.grpo, beta=0.0))
    tokenizer, mesh, model_cfg = setup(cfg.model, cfg.mesh, cfg.prompts.tokenizer)
    with pytest.raises(MalformedRecordError, match=r"prompts\.jsonl:2"):
        GRPOTask(cfg, model_cfg, tokenizer, mesh)
    cfg = dataclasses.replace(cfg, prompts=dataclasses.replace(cfg.prompts, skip_malformed=True))
    task = GRPOTask(cfg, model_cfg, tokenizer, mesh)
    assert {r["answer"] for r in next(task.prompts)} == {"2", "4"}
