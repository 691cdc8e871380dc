"""The regulariser hook of the train step: added once per optimizer step, after the
token normalisation, so its value and gradient do not change with grad_accum_steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpost.peft import regularisers as R
from jaxpost.train.state import TrainState
from jaxpost.train.step import train_step


def _loss_fn(params, batch, rng):
    """A (sum, count, aux) objective with uneven counts per row: masked squared error."""
    del rng
    pred = batch["x"] @ params["w"]["kernel"] + params["b"]
    err = jnp.sum(jnp.square(pred - batch["y"]), -1) * batch["mask"]
    return jnp.sum(err), jnp.sum(batch["mask"]), {}


def test_regulariser_value_and_gradient_do_not_change_with_grad_accum_steps():
    rng = np.random.default_rng(0)
    params = {"w": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)},
              "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    batch = {"x": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
             "mask": jnp.asarray([1, 0, 1, 1, 0, 1, 1, 1], jnp.float32)}
    anchor = jax.tree.map(lambda x: x + 0.01, params)  # W − W0 = −0.01 everywhere
    weight = 3.0
    reg = R.l2_to_start(weight, anchor=anchor)
    opt = optax.sgd(1.0)  # update = −gradient
    state = TrainState.create(params, opt, seed=0)

    def run(accum, regs):
        fn = jax.jit(lambda s, b: train_step(s, b, loss_fn=_loss_fn, optimizer=opt,
                                             grad_accum_steps=accum, regularisers=regs))
        return fn(state, batch)

    # Without the regulariser the step is accumulation-invariant (tests/train/test_step.py),
    # so one plain run is the reference of both.
    out = {(1, False): run(1, ()), (1, True): run(1, (reg,)), (4, True): run(4, (reg,))}
    for accum in (1, 4):
        (s_reg, m_reg), (s_plain, m_plain) = out[(accum, True)], out[(1, False)]
        np.testing.assert_allclose(float(m_reg["reg_loss"]), weight * 18 * 1e-4, rtol=1e-4)
        np.testing.assert_allclose(float(m_reg["reg_l2_to_start"]), float(m_reg["reg_loss"]))
        np.testing.assert_allclose(float(m_reg["loss"]),
                                   float(m_plain["loss"]) + float(m_reg["reg_loss"]), rtol=1e-6)
        np.testing.assert_allclose(float(m_reg["task_loss"]), float(m_plain["loss"]), rtol=1e-6)
        # The regulariser's share of the update is exactly −∇ = −2·w·(W − W0) = +0.06,
        # not divided by the count (6 rows) nor multiplied by the micro-batches.
        reg_update = jax.tree.map(lambda r, p: r - p, s_reg.trainable, s_plain.trainable)
        chex.assert_trees_all_close(
            reg_update, jax.tree.map(lambda x: jnp.full_like(x, 2 * weight * 0.01), params),
            atol=1e-6)
    chex.assert_trees_all_close(out[(1, True)][0].trainable, out[(4, True)][0].trainable,
                                atol=1e-6)
    np.testing.assert_allclose(float(out[(1, True)][1]["reg_loss"]),
                               float(out[(4, True)][1]["reg_loss"]), rtol=1e-6)
