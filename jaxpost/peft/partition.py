"""Splitting params into trainable and frozen trees, and combining them again.

Both halves are nested dicts with the params' paths and disjoint leaves: `trainable`
holds every leaf that trains in at least one layer, `frozen` the leaves that train
nowhere. The train step differentiates `trainable` only and sees `combine(frozen,
trainable)`; the optimizer never sees `frozen` (so it holds no optimizer state for it).
A stacked leaf that trains in some layers only stays in `trainable` with a per-layer
*update mask* that zeroes its gradient (before clipping and the gradient norm) and its
final update (after weight decay), so the frozen rows stay bit-identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.peft.freeze import Mask

Tree = dict[str, Any]


def _is_mask_leaf(x) -> bool:
    return isinstance(x, (bool, np.bool_, np.ndarray))


def _empty(x) -> bool:
    return x is None or (isinstance(x, dict) and not x)


def split(params: Tree, mask: Mask) -> tuple[Tree, Tree]:
    """`(trainable, frozen)` of a nested-dict params tree; empty sub-dicts are dropped."""
    def go(p, m):
        if not isinstance(p, dict):
            return (p, None) if (m is True or isinstance(m, np.ndarray)) else (None, p)
        train, frozen = {}, {}
        for k, v in p.items():
            t, f = go(v, m[k])
            if not _empty(t):
                train[k] = t
            if not _empty(f):
                frozen[k] = f
        return train, frozen
    if not isinstance(params, dict):
        raise TypeError(f"split expects nested dicts of params, got {type(params).__name__}")
    return go(params, mask)


def combine(frozen: Tree, trainable: Tree) -> Tree:
    """The full params: the deep merge of two trees with disjoint leaves."""
    if not isinstance(frozen, dict) or not isinstance(trainable, dict):
        if _empty(frozen):
            return trainable
        if _empty(trainable):
            return frozen
        raise ValueError("combine: a leaf is both frozen and trainable")
    out = dict(frozen)
    for k, v in trainable.items():
        out[k] = combine(frozen[k], v) if k in frozen else v
    return out


def update_masks(trainable: Tree, mask: Mask) -> Tree:
    """Per trainable leaf: None (trains everywhere) or a float32 array broadcastable to it
    (1 on the layers that train, 0 on frozen layers)."""
    def go(t, m):
        if isinstance(t, dict):
            return {k: go(v, m[k]) for k, v in t.items()}
        if isinstance(m, np.ndarray):
            return m.astype(np.float32).reshape((-1,) + (1,) * (len(np.shape(t)) - 1))
        return None
    return go(trainable, mask)


def apply_update_masks(tree: Tree, masks: Tree | None) -> Tree:
    """`tree * mask` on partially frozen leaves (frozen rows become exactly 0)."""
    if masks is None:
        return tree
    return jax.tree.map(lambda x, m: x if m is None else x * jnp.asarray(m, x.dtype),
                        tree, masks, is_leaf=lambda x: x is None)


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Trainable vs frozen parameter counts (a partially frozen leaf counts by layer)."""

    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def describe(self) -> str:
        frac = self.trainable / max(self.total, 1)
        return (f"trainable params: {self.trainable:,} of {self.total:,} ({100 * frac:.2f}%); "
                f"frozen: {self.frozen:,}")


def count_params(shapes: Tree, mask: Mask) -> ParamCounts:
    """Counts of the elements that train and that are frozen under `mask`."""
    leaves = jax.tree.leaves(shapes)
    masks = jax.tree.leaves(mask, is_leaf=_is_mask_leaf)
    trainable = total = 0
    for x, m in zip(leaves, masks):
        size = int(np.prod(np.shape(x)))
        total += size
        if isinstance(m, np.ndarray):
            trainable += size // len(m) * int(m.sum())
        elif m:
            trainable += size
    return ParamCounts(trainable=trainable, frozen=total - trainable)


__all__ = ["ParamCounts", "apply_update_masks", "combine", "count_params", "split",
           "update_masks"]
