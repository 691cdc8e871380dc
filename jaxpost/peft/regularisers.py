"""Regularisers: pure terms of `(trainable, frozen)` and cached statistics, added to the
loss once per optimizer step.

A `Regulariser` is `fn(trainable, frozen, stats) -> (value, metrics)`: `value` a float32
scalar already weighted, `metrics` the weighted terms to log. `jaxpost.train.step` adds
`value` to the token-normalised loss after the gradient-accumulation normalisation (not
per micro-batch, not divided by the token count), so its weight does not depend on
`grad_accum_steps`. `stats` (a Fisher, the starting weights) is a pytree of arrays the
jitted step receives as an argument, never as a closure (a closed-over array would be
baked into the compiled program as a constant).

The first users here: L2-to-start and EWC (Kirkpatrick et al. 2017) with a diagonal
Fisher, for LoRA (ΔW = s·A·B of each adapter; with several adapters per kernel, their
sum) and for full fine-tuning (ΔW = W − W0, W0 passed in `stats["anchor"]`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxpost.peft import lora as L
from jaxpost.peft.partition import combine

__all__ = [
    "RegFn",
    "Regulariser",
    "adapter_deltas",
    "anchor_deltas",
    "ewc",
    "l2_to_start",
    "regularisation",
]

RegFn = Callable[[Any, Any, Any], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Regulariser:
    """A named loss term and the statistics it reads.

    Attributes:
      name: identifies the term (the metric of its value when `fn` logs nothing else).
      fn: `fn(trainable, frozen, stats) -> (value, metrics)`, pure and traceable.
      stats: pytree of arrays (Fisher, anchor); `make_train_step` passes it to the jitted
        step as a sharded argument.
    """

    name: str
    fn: RegFn
    stats: Any = None

    def __call__(self, trainable, frozen) -> tuple[jax.Array, dict[str, jax.Array]]:
        return self.fn(trainable, frozen, self.stats)


def regularisation(regularisers, trainable, frozen):
    """`(value, metrics, grads)`: the summed terms, their metrics, and the gradient of the
    sum w.r.t. `trainable` (float32 scalar; grads shaped like `trainable`)."""
    def total(t):
        value, metrics = jnp.zeros((), jnp.float32), {}
        for r in regularisers:
            v, m = r(t, frozen)
            value = value + jnp.asarray(v, jnp.float32)
            metrics.update(m or {r.name: v})
        return value, metrics
    (value, metrics), grads = jax.value_and_grad(total, has_aux=True)(trainable)
    return value, metrics, grads


# ------------------------------------------------------------------------------ deltas
def _module_deltas(node: Mapping, scale: float, suffixes) -> jax.Array | None:
    parts = []
    for sfx in suffixes:
        a, b = node.get(L.LORA_A + sfx), node.get(L.LORA_B + sfx)
        if a is not None and b is not None:
            parts.append(scale * jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32),
                                            b.astype(jnp.float32),
                                            precision=jax.lax.Precision.HIGHEST))
    return sum(parts[1:], parts[0]) if parts else None


def adapter_deltas(params: Mapping, scale: float, suffixes=("",)) -> dict:
    """ΔW = scale·A·B (float32, kernel layout [(L,) in, out]) of every LoRA adapter.

    Args:
      params: params (or the trainable half) holding `lora_a{sfx}`/`lora_b{sfx}` leaves.
      scale: the adapter scale (`LoraConfig.scale`).
      suffixes: which adapter pairs to sum per kernel ("" = the `lora_a`/`lora_b` pair;
        see `jaxpost.peft.lora.adapter_suffixes`).

    Returns:
      Nested dicts `{..module path..: {"kernel": ΔW}}`, the paths of the adapted kernels.
    """
    def go(node):
        out = {}
        delta = _module_deltas(node, scale, suffixes)
        if delta is not None:
            out["kernel"] = delta
        for k, v in node.items():
            if isinstance(v, Mapping):
                sub = go(v)
                if sub:
                    out[k] = sub
        return out
    return go(params)


def anchor_deltas(trainable: Mapping, anchor: Mapping) -> dict:
    """ΔW = W − W0 (float32) for every leaf of `anchor` (a subtree of `trainable`)."""
    def go(t, a):
        if isinstance(a, Mapping):
            return {k: go(t[k], v) for k, v in a.items()}
        return t.astype(jnp.float32) - a.astype(jnp.float32)
    return go(trainable, anchor)


def _deltas(trainable, frozen, stats, lora_scale):
    if lora_scale:
        return adapter_deltas(combine(frozen, trainable), lora_scale,
                              L.adapter_suffixes(combine(frozen, trainable)))
    return anchor_deltas(trainable, stats["anchor"])


def _sum_tree(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return sum((jnp.sum(x) for x in leaves[1:]), jnp.sum(leaves[0])) if leaves else \
        jnp.zeros((), jnp.float32)


def l2_to_start(weight: float, *, lora_scale: float = 0.0, anchor: Any = None,
                name: str = "reg_l2_to_start") -> Regulariser:
    """`weight · Σ ‖ΔW‖²` over the adapters (LoRA: pass `lora_scale`) or, in full
    fine-tuning, over the leaves of `anchor` (the starting values of the trainable params)."""
    if not lora_scale and anchor is None:
        raise ValueError("l2_to_start: pass lora_scale (LoRA) or anchor (full fine-tuning: "
                         "the starting trainable params)")

    def fn(trainable, frozen, stats):
        deltas = _deltas(trainable, frozen, stats, lora_scale)
        value = weight * _sum_tree(jax.tree.map(jnp.square, deltas))
        return value, {name: value}
    return Regulariser(name, fn, None if lora_scale else {"anchor": anchor})


def ewc(weight: float, fisher: Any, *, lora_scale: float = 0.0, anchor: Any = None,
        name: str = "reg_ewc") -> Regulariser:
    """EWC with a diagonal Fisher: `weight · Σ F ⊙ ΔW²` over the leaves of `fisher`.

    `fisher` is a nested dict mirroring the params (`jaxpost.peft.fisher.diagonal_fisher`):
    under LoRA it holds the adapted kernels (`.../q_proj/kernel`) and ΔW = s·A·B; in full
    fine-tuning any trainable leaves, with ΔW = W − `anchor`. A kernel with a Fisher but
    no adapter (or no anchor) is an error at trace time, naming it.
    """
    if not lora_scale and anchor is None:
        raise ValueError("ewc: pass lora_scale (LoRA) or anchor (full fine-tuning)")

    def fn(trainable, frozen, stats):
        deltas = _deltas(trainable, frozen, stats, lora_scale)
        fish = stats["fisher"]
        value = weight * _sum_tree(_weighted_squares(fish, deltas, ()))
        return value, {name: value}
    stats = {"fisher": fisher} if lora_scale else {"fisher": fisher, "anchor": anchor}
    return Regulariser(name, fn, stats)


def _weighted_squares(fisher, deltas, where):
    if isinstance(fisher, Mapping):
        out = {}
        for k, v in fisher.items():
            if not isinstance(deltas, Mapping) or k not in deltas:
                leaf = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(v)[0][0][0],
                                            simple=True, separator="/") if isinstance(
                                                v, Mapping) else ""
                full = "/".join(where + (k,)) + (f"/{leaf}" if leaf else "")
                raise ValueError(f"ewc: the Fisher has {full} but the "
                                 "params hold no update for it (no LoRA adapter there, or "
                                 "not trainable); compute the Fisher for these targets")
            out[k] = _weighted_squares(v, deltas[k], where + (k,))
        return out
    return fisher.astype(jnp.float32) * jnp.square(deltas)
