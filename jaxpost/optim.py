"""Optimizers and learning-rate schedules from config (optax).

Weight decay skips norm scales and biases by parameter path: layers are stacked, so
"1-D parameter" is not a usable test for "norm scale" here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer, schedule and clipping; defaults are AdamW as in HF Trainer."""

    name: Literal["adamw", "sgd"] = "adamw"  # update rule
    lr: float = 1e-4  # peak learning rate (after warm-up)
    schedule: Literal["constant", "cosine", "linear"] = "cosine"  # decay after warm-up
    warmup_steps: int = 0  # linear warm-up from 0 to `lr` over this many steps
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio for cosine / linear decay
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.999  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    weight_decay: float = 0.0  # decoupled weight decay (AdamW) on matrices, not norms/biases
    momentum: float = 0.0  # SGD momentum (0 = plain SGD)
    clip_grad_norm: float = 1.0  # global-norm clipping threshold; 0 disables it

    def __post_init__(self):
        # NaN fails every comparison below, so each check also rejects NaN (and inf
        # where an upper bound or `finite` applies).
        def check(key: str, ok: bool, want: str) -> None:
            if not ok:
                raise ValueError(f"optimizer.{key}={getattr(self, key)!r}: must be {want}")

        check("lr", math.isfinite(self.lr) and self.lr >= 0,
              "a finite number >= 0 (0 trains nothing)")
        check("eps", math.isfinite(self.eps) and self.eps > 0,
              "a finite number > 0 (AdamW divides by sqrt(v) + eps, and v is 0 for "
              "parameters whose gradient is 0: eps=0 makes them NaN)")
        check("b1", 0.0 <= self.b1 < 1.0, "in [0, 1)")
        check("b2", 0.0 <= self.b2 < 1.0, "in [0, 1)")
        check("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0,
              "a finite number >= 0")
        check("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1) (0 = plain SGD)")
        check("clip_grad_norm", math.isfinite(self.clip_grad_norm) and self.clip_grad_norm >= 0,
              "a finite number >= 0 (0 disables clipping)")
        check("warmup_steps", self.warmup_steps >= 0, ">= 0")
        check("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "in [0, 1]")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `cfg.lr`, then constant, cosine or linear decay to the end."""
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    else:
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(params):
    """True for parameters that get weight decay: kernels and embeddings."""
    def leaf_decays(path, _):
        return getattr(path[-1], "key", None) not in ("scale", "bias")
    return jax.tree_util.tree_map_with_path(leaf_decays, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """The optax chain: clipping, then AdamW or SGD driven by the schedule."""
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask)
    else:
        parts = [optax.sgd(schedule, momentum=cfg.momentum or None)]
        if cfg.weight_decay:
            parts.insert(0, optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
        core = optax.chain(*parts)
    if cfg.clip_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), core)
    return core
