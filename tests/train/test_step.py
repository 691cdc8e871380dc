"""The train step: (sum, count) normalisation, accumulation invariance, sharding, NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost import sharding as sh
from jaxpost.models import init_params, tiny
from jaxpost.optim import OptimizerConfig, make_optimizer
from jaxpost.train.sft import make_sft_loss
from jaxpost.train.state import TrainState
from jaxpost.train.step import make_train_step, split_microbatches, state_shardings, train_step

CFG = tiny("llama", num_layers=1, vocab_size=64)


def _batch(b=8, t=10, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
    # Uneven target counts per row: row i has its last i+1 tokens as targets.
    loss_mask = np.zeros((b, t), np.float32)
    for i in range(b):
        loss_mask[i, t - 1 - (i % (t - 1)):] = 1.0
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    return {"tokens": tokens, "positions": positions, "segment_ids": np.ones((b, t), np.int32),
            "loss_mask": loss_mask}


def _state(opt):
    return TrainState.create(init_params(CFG, jax.random.key(0)), opt, seed=0)


def test_sft_loss_equals_numpy_masked_mean_nll():
    params = init_params(CFG, jax.random.key(0))
    batch = _batch()
    loss_sum, count, aux = make_sft_loss(CFG)(params, batch, None)
    from jaxpost.models import Transformer
    logits = np.asarray(Transformer(CFG).apply({"params": params}, batch["tokens"]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], batch["tokens"][:, 1:, None], -1)[..., 0]
    mask = batch["loss_mask"][:, 1:]
    np.testing.assert_allclose(float(loss_sum), (nll * mask).sum(), rtol=1e-5)
    assert float(count) == mask.sum()
    assert 0.0 <= float(aux["token_accuracy"][0]) <= float(count)


def test_split_microbatches_is_strided_and_checks_divisibility():
    x = {"a": jnp.arange(8)}
    np.testing.assert_array_equal(split_microbatches(x, 4)["a"], [[0, 4], [1, 5], [2, 6], [3, 7]])
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        split_microbatches(x, 3)


@pytest.mark.slow  # ~10 s: two compiled steps
def test_grad_accumulation_8x1_equals_1x8_with_uneven_token_counts():
    opt = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10)
    loss_fn = make_sft_loss(CFG)
    batch = jax.tree.map(jnp.asarray, _batch())
    one = jax.jit(lambda s, b: train_step(s, b, loss_fn=loss_fn, optimizer=opt, grad_accum_steps=1))
    eight = jax.jit(lambda s, b: train_step(s, b, loss_fn=loss_fn, optimizer=opt, grad_accum_steps=8))
    s1, m1 = one(_state(opt), batch)
    s8, m8 = eight(_state(opt), batch)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-4)
    assert float(m1["count"]) == float(m8["count"]) == float(batch["loss_mask"].sum())
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    # The mean of per-micro-batch means (the common bug) differs from the true loss here.
    params0 = _state(opt).params
    row_loss = jax.jit(lambda p, b: loss_fn(p, b, None))
    rows = [row_loss(params0, jax.tree.map(lambda x: x[i:i + 1], batch)) for i in range(8)]
    naive = np.mean([float(s) / float(c) for s, c, _ in rows])
    assert abs(naive - float(m1["loss"])) > 1e-3


def test_nonfinite_loss_leaves_params_untouched_and_flags_it():
    opt = make_optimizer(OptimizerConfig(lr=1e-2), 10)

    def nan_loss(params, batch, rng):
        loss_sum, count, aux = make_sft_loss(CFG)(params, batch, rng)
        return loss_sum * jnp.nan, count, aux

    state = _state(opt)
    new, metrics = jax.jit(lambda s, b: train_step(s, b, loss_fn=nan_loss, optimizer=opt))(
        state, jax.tree.map(jnp.asarray, _batch()))
    assert int(metrics["nonfinite"]) == 1 and int(new.step) == 0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # heavy: the not-slow suite has a 5-minute budget
def test_train_step_on_8_devices_equals_1_device():
    opt = make_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.1), 10)
    loss_fn = make_sft_loss(CFG)
    batch = _batch()
    results = []
    for devices, mesh_cfg in ((jax.devices()[:1], sh.MeshConfig()),
                              (jax.devices(), sh.MeshConfig(data=2, fsdp=2, tensor=2))):
        mesh = sh.make_mesh(mesh_cfg, devices)
        p_shard = sh.param_shardings(CFG, mesh)
        state = _state(opt)
        s_shard = state_shardings(jax.eval_shape(lambda: state), p_shard, mesh)
        state = jax.device_put(state, s_shard)
        placed = sh.shard_batch(batch, mesh)
        step = make_train_step(loss_fn, opt, mesh=mesh, state_sharding=s_shard,
                               batch_sharding=jax.tree.map(lambda x: x.sharding, placed),
                               grad_accum_steps=2)
        for _ in range(2):
            state, metrics = step(state, placed)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
        if len(devices) == 8:
            mu = state.opt_state[1][0].mu["layers"]["mlp"]["up_proj"]["kernel"]
            assert mu.sharding.spec == p_shard["layers"]["mlp"]["up_proj"]["kernel"].spec
    (p1, m1), (p8, m8) = results
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_schedule_warmup_then_cosine_and_decay_mask():
    from jaxpost.optim import decay_mask, make_schedule
    sched = make_schedule(OptimizerConfig(lr=1.0, warmup_steps=4, schedule="cosine"), 14)
    np.testing.assert_allclose([sched(i) for i in (0, 2, 4, 9, 14)], [0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    lin = make_schedule(OptimizerConfig(lr=1.0, schedule="linear", min_lr_ratio=0.5), 10)
    np.testing.assert_allclose([lin(0), lin(10)], [1.0, 0.5], atol=1e-6)
    mask = decay_mask(init_params(tiny("qwen2"), jax.random.key(0)))
    assert mask["layers"]["self_attn"]["q_proj"]["kernel"] is True
    assert mask["layers"]["self_attn"]["q_proj"]["bias"] is False
    assert mask["norm"]["scale"] is False
    assert isinstance(make_optimizer(OptimizerConfig(name="sgd", momentum=0.9, weight_decay=0.1), 5),
                      optax.GradientTransformation)
