"""The objective-agnostic train step: `(state, batch) -> (state, metrics)`.

An objective is a pure `loss_fn(params, batch, rng) -> (loss_sum, count, aux)` whose loss
is a *sum* with its normaliser `count` (tokens, or sequences) and whose `aux` maps metric
names to `(sum, weight)` pairs. Gradient accumulation sums both over micro-batches and
divides once at the end, so the result is normalised by the true count across all
micro-batches (Tunix's convention; the silent bug it avoids is averaging per-micro-batch
means). Regularisers (`jaxpost.peft.regularisers.Regulariser`: pure functions of
`(trainable, frozen)` and cached statistics) are added after that division, once per
optimizer step, so their weight does not depend on `grad_accum_steps`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxpost import sharding as sh
from jaxpost.peft.partition import apply_update_masks, combine
from jaxpost.peft.regularisers import Regulariser, regularisation
from jaxpost.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]


def split_microbatches(batch: dict, num: int) -> dict:
    """[B, ...] -> [num, B/num, ...] taking rows i*num + j into micro-batch j.

    Strided rows keep each device's contiguous block of the batch on that device.
    """
    def split(x):
        b = x.shape[0]
        if b % num:
            raise ValueError(
                f"batch size {b} is not divisible by grad_accum_steps={num}")
        return jnp.swapaxes(x.reshape((b // num, num) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: LossFn, trainable, batch: dict, rng: jax.Array,
                         num_micro: int, frozen=None):
    """Sums of grads (w.r.t. `trainable`), loss, count and aux over `num_micro`
    micro-batches (lax.scan); the objective sees `combine(frozen, trainable)`."""
    def objective(t, mb, r):
        return _sum_and_rest(loss_fn, combine(frozen, t) if frozen else t, mb, r)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if num_micro == 1:
        (loss_sum, (count, aux)), grads = grad_fn(trainable, batch, rng)
        return grads, loss_sum, count, aux

    micro = split_microbatches(batch, num_micro)
    rngs = jax.random.split(rng, num_micro)
    first = jax.tree.map(lambda x: x[0], micro)
    _, (count0, aux0) = jax.eval_shape(lambda: objective(trainable, first, rngs[0]))
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731
    init = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32), zeros(count0),
            zeros(aux0))

    def body(carry, xs):
        g_acc, l_acc, c_acc, a_acc = carry
        mb, r = xs
        (l, (c, a)), g = grad_fn(trainable, mb, r)
        add = lambda x, y: jax.tree.map(jnp.add, x, y)  # noqa: E731
        return (add(g_acc, g), l_acc + l, c_acc + c, add(a_acc, a)), None

    (grads, loss_sum, count, aux), _ = jax.lax.scan(body, init, (micro, rngs))
    return grads, loss_sum, count, aux


def _sum_and_rest(loss_fn: LossFn, params, batch, rng):
    loss_sum, count, aux = loss_fn(params, batch, rng)
    return loss_sum.astype(jnp.float32), (jnp.asarray(count, jnp.float32), aux)


def train_step(state: TrainState, batch: dict, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation, grad_accum_steps: int = 1,
               schedule: optax.Schedule | None = None, update_masks=None,
               regularisers: Sequence[Regulariser] = ()):
    """One optimizer step over `state.trainable`.

    `regularisers` are added to the token-normalised loss (and their gradients to its
    gradient) once per step; `loss` is then the total, `task_loss` the objective's part
    and `reg_loss` their sum, each regulariser's metrics logged beside them.

    `update_masks` (from `jaxpost.peft.partition.update_masks`) zeroes the gradient of the
    frozen layers of partially frozen stacked leaves before the norm and clipping, and
    their final update after the optimizer (weight decay included), so those rows stay
    bit-identical. A non-finite loss or gradient, or an update that would make any
    trainable parameter non-finite (e.g. AdamW with `eps=0` dividing 0 by 0), leaves the
    state unchanged and sets `metrics["nonfinite"]` (and `metrics["nonfinite_params"]`
    for the latter) so the loop can stop with the step named: a NaN or inf never reaches
    the params, hence never a checkpoint.
    """
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    grads, loss_sum, count, aux = accumulate_gradients(
        loss_fn, state.trainable, batch, step_rng, grad_accum_steps, frozen=state.frozen)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    loss = loss_sum / denom
    reg_metrics = {}
    if regularisers:
        reg, reg_metrics, reg_grads = regularisation(regularisers, state.trainable, state.frozen)
        grads = jax.tree.map(lambda g, r: g + r.astype(g.dtype), grads, reg_grads)
        reg_metrics = {"task_loss": loss, "reg_loss": reg, **reg_metrics}
        loss = loss + reg
    grads = apply_update_masks(grads, update_masks)
    grad_norm = optax.tree.norm(grads)
    finite_inputs = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    updates = apply_update_masks(updates, update_masks)
    trainable = optax.apply_updates(state.trainable, updates)
    # One fused elementwise pass over the new params (no norm: squares could overflow in
    # low precision and flag params that are finite).
    finite_params = _all_finite(trainable)
    finite = finite_inputs & finite_params
    # A cond, not an elementwise select: XLA then writes the chosen state in place instead
    # of reading the old and the new state and writing a third (~4% of a tiny-llama SFT
    # step on CPU).
    trainable, opt_state = jax.lax.cond(
        finite, lambda: (trainable, opt_state), lambda: (state.trainable, state.opt_state))
    new_state = state.replace(
        step=state.step + finite.astype(jnp.int32), trainable=trainable,
        opt_state=opt_state, rng=jax.random.key_data(rng))
    metrics = {"loss": loss, "grad_norm": grad_norm, "count": count,
               "nonfinite": (~finite).astype(jnp.int32),
               "nonfinite_params": (finite_inputs & ~finite_params).astype(jnp.int32)}
    if schedule is not None:
        metrics["lr"] = schedule(state.step)
    for name, (s, w) in aux.items():
        metrics[name] = s / jnp.maximum(w, 1e-9)
    metrics.update(reg_metrics)
    return new_state, metrics


def _all_finite(tree) -> jax.Array:
    """Whether every element of every floating leaf of `tree` is finite (a bool scalar)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def state_shardings(state_shapes: TrainState, param_shardings, mesh):
    """Shardings of a TrainState from the shardings of the full params: trainable and
    frozen leaves take theirs; optimizer leaves that mirror a trainable parameter (Adam
    moments: same path suffix, same shape) take its sharding; counters and the rng
    replicate."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    trainable_sh = _subtree(param_shardings, state_shapes.trainable)
    frozen_sh = _subtree(param_shardings, state_shapes.frozen)
    by_path = {_path_key(p): s for p, s in jax.tree_util.tree_leaves_with_path(trainable_sh)}
    shapes = {_path_key(p): x.shape
              for p, x in jax.tree_util.tree_leaves_with_path(state_shapes.trainable)}

    def opt_leaf(path, leaf):
        key = _path_key(path)
        for pkey, s in by_path.items():
            if key.endswith("/" + pkey) and leaf.shape == shapes[pkey]:
                return s
        return replicated

    opt = jax.tree_util.tree_map_with_path(opt_leaf, state_shapes.opt_state)
    return TrainState(step=replicated, trainable=trainable_sh, frozen=frozen_sh, opt_state=opt,
                      rng=replicated)


def _subtree(full, like):
    """The part of the nested dict `full` with the keys of `like` (a split half)."""
    if not isinstance(like, dict):
        return full
    return {k: _subtree(full[k], v) for k, v in like.items()}


def _path_key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, mesh,
                    state_sharding, batch_sharding, grad_accum_steps: int = 1,
                    schedule: optax.Schedule | None = None, rules=sh.DEFAULT_RULES,
                    update_masks=None, regularisers: Sequence[Regulariser] = ()):
    """`train_step` jitted with explicit in/out shardings and the state donated.

    With `regularisers`, their `stats` are arguments of the jitted function (placed on
    their own NamedSharding when they have one on `mesh`, else replicated), never
    compile-time constants; the returned `fn(state, batch)` passes them in.
    """
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step(state, batch, stats=()):
        regs = tuple(dataclasses.replace(r, stats=s) for r, s in zip(regularisers, stats))
        with sh.logical_rules(mesh, rules):
            return train_step(state, batch, loss_fn=loss_fn, optimizer=optimizer,
                              grad_accum_steps=grad_accum_steps, schedule=schedule,
                              update_masks=update_masks, regularisers=regs)
    if not regularisers:
        return jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, replicated), donate_argnums=(0,))

    def placement(x):
        s = getattr(x, "sharding", None)
        return s if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh else replicated
    stats = tuple(r.stats for r in regularisers)
    stats_sharding = jax.tree.map(placement, stats)
    stats = jax.device_put(stats, stats_sharding)
    jitted = jax.jit(step, in_shardings=(state_sharding, batch_sharding, stats_sharding),
                     out_shardings=(state_sharding, replicated), donate_argnums=(0,))

    def step_with_stats(state, batch):
        return jitted(state, batch, stats)
    step_with_stats.jitted = jitted  # for lowering / trace counting
    return step_with_stats
