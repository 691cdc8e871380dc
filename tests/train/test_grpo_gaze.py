"""GRPO with gaze token credit: the rollout's advantages and the step on 1 vs 8 devices."""

import dataclasses
import types

import chex
import jax
import numpy as np
import pytest

from jaxpost import sharding as sh
from jaxpost.models import init_params
from jaxpost.optim import OptimizerConfig, make_optimizer
from jaxpost.rl import grpo
from jaxpost.rl.credit import TokenCreditError, token_credit_weights
from jaxpost.rl.gaze import gaze_credit
from jaxpost.train.common import setup
from jaxpost.train.grpo import GRPOTask, make_grpo_loss
from jaxpost.train.state import TrainState
from jaxpost.train.step import make_train_step, state_shardings
from tests.train.test_grpo import _small_grpo

SPEC = "jaxpost.rl.gaze:gaze_credit(standardize=True)"


def _gaze_task(tmp_path, credit=SPEC, mode="weighted"):
    cfg = _small_grpo(tmp_path, token_credit=credit, token_credit_mode=mode)
    cfg = dataclasses.replace(
        cfg, mesh=dataclasses.replace(cfg.mesh, num_devices=1),
        grpo=dataclasses.replace(cfg.grpo, beta=0.0, num_iterations=1,
                                 max_completion_length=8))
    tokenizer, mesh, model_cfg = setup(cfg.model, cfg.mesh, cfg.prompts.tokenizer)
    task = GRPOTask(cfg, model_cfg, tokenizer, mesh)
    params = init_params(model_cfg, jax.random.key(0))
    state = types.SimpleNamespace(params=params, rng=jax.random.key_data(jax.random.key(0)))
    return task, state, model_cfg, tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weighted", "reward_to_go"])
def test_rollout_advantages_are_gaze_weighted_sequence_advantages(tmp_path, mode):
    task, state, _, tokenizer = _gaze_task(tmp_path, mode=mode)
    batch, _ = task.next_batch(state)
    adv, mask = batch["advantages"], batch["completion_mask"]
    chex.assert_equal_shape([adv, mask])
    p = task.g.max_prompt_length
    ids = batch["tokens"][:, p:]  # completion tokens (rows: prompt, then completion)
    weights = gaze_credit(standardize=True)(completion_ids=ids, mask=mask, tokenizer=tokenizer)
    seq = adv.sum(1) / np.maximum(mask.sum(1), 1) if mode == "weighted" else adv[:, 0]
    expected = grpo.token_advantages(seq, mask, weights, mode)
    chex.assert_trees_all_close(adv, np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert np.all(adv[mask == 0] == 0)
    rows = (np.abs(seq) > 1e-6) & (mask.sum(1) > 1)
    assert rows.any()
    # Not the uniform broadcast: within a row the advantages vary with reading time.
    spread = [np.ptp(adv[i][mask[i] > 0]) for i in np.flatnonzero(rows)]
    assert max(spread) > 1e-3


def test_bad_credit_results_are_errors_naming_the_function():
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    args = dict(prompts=["a", "b"], completions=["x", "y"], completion_ids=np.zeros((2, 3)),
                mask=mask, tokenizer=None, logprobs=np.zeros((2, 3)), columns={"answer": [1, 2]})
    seen = {}

    def record(**kw):
        seen.update(kw)
        return np.where(kw["mask"] > 0, 2.0, 5.0)

    w = token_credit_weights(record, "record", **args)
    np.testing.assert_array_equal(w, 2.0 * mask)  # padding zeroed
    assert seen["answer"] == [1, 2] and seen["completions"] == ["x", "y"]
    for fn, match in ((lambda **kw: np.ones((2, 4)), "returned shape"),
                      (lambda **kw: -np.ones((2, 3)), "returned negative weights"),
                      (lambda **kw: np.full((2, 3), np.nan), "returned non-finite")):
        with pytest.raises(TokenCreditError, match="token_credit bad " + match):
            token_credit_weights(fn, "bad", **args)
    with pytest.raises(TokenCreditError, match=r"columns \['mask'\]"):
        token_credit_weights(record, "record", **{**args, "columns": {"mask": [0, 0]}})


@pytest.mark.slow
def test_grpo_step_with_gaze_credit_on_8_devices_equals_1_device(tmp_path):
    task, state, model_cfg, _ = _gaze_task(tmp_path)
    batch, _ = task.next_batch(state)
    loss_fn = make_grpo_loss(model_cfg, task.g)
    opt = make_optimizer(OptimizerConfig(lr=1e-3), 10)
    results = []
    for devices, mesh_cfg in ((jax.devices()[:1], sh.MeshConfig()),
                              (jax.devices(), sh.MeshConfig(data=2, fsdp=2, tensor=2))):
        mesh = sh.make_mesh(mesh_cfg, devices)
        st = TrainState.create(init_params(model_cfg, jax.random.key(0)), opt, seed=0)
        shardings = state_shardings(jax.eval_shape(lambda s=st: s),
                                    sh.param_shardings(model_cfg, mesh), mesh)
        st = jax.device_put(st, shardings)
        placed = sh.shard_batch(batch, mesh)
        step = make_train_step(loss_fn, opt, mesh=mesh, state_sharding=shardings,
                               batch_sharding=jax.tree.map(lambda x: x.sharding, placed))
        st, metrics = step(st, placed)
        results.append((jax.device_get(st.params), jax.device_get(metrics)))
    (p1, m1), (p8, m8) = results
    assert abs(float(m1["loss"])) > 0 and float(m1["grad_norm"]) > 0
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(p1, p8, atol=1e-5, rtol=1e-4)
