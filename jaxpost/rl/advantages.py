"""Advantage estimators by name: `grpo` (group-relative), `rloo` (leave-one-out), `gae`.

The registry beside `jaxpost.rl.grpo.LOSS_TYPES`: a recipe names its estimator
(`advantage_estimator = "rloo"`) and a new one is one small registered function. Every
estimator has the signature

    fn(rewards [N], mask [N, T], *, group_size, scale_rewards, token_rewards=None,
       values=None, gamma=1.0, lam=1.0) -> (advantages, stats)

and ignores what it does not use. `advantages` is `[N]` (a sequence advantage, broadcast or
credited per token by `jaxpost.rl.grpo.token_advantages`) or `[N, T]` (per token, already
final); `stats` maps metric names to float32 scalars (and, for `gae`, `returns` to `[N, T]`).
Rows of one prompt are contiguous, `N = num_prompts * group_size`; a NaN reward marks a row
no reward function scored: it is left out of every statistic and gets advantage 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxpost.rl import ppo
from jaxpost.rl.grpo import ADVANTAGE_EPS, SCALE_REWARDS, _nan_mean_std, group_advantages

AdvantageEstimator = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]

#: Estimators by name; add one with `register_advantage_estimator`.
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}

#: Estimators that need a critic's `values` (and so a value head): only PPO recipes offer one.
NEEDS_VALUES: set[str] = set()


def register_advantage_estimator(name: str, *, needs_values: bool = False,
                                 ) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator adding an estimator under `name` (see the module docstring for its shape)."""
    def register(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        if needs_values:
            NEEDS_VALUES.add(name)
        return fn
    return register


def estimate_advantages(name: str, rewards: jax.Array, mask: jax.Array, **kwargs):
    """Runs the estimator `name`; a clear error for an unknown name or a missing critic."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage_estimator {name!r}; expected one of "
                         f"{sorted(ADVANTAGE_ESTIMATORS)}")
    if name in NEEDS_VALUES and kwargs.get("values") is None:
        raise ValueError(f"advantage_estimator={name!r} needs a critic's values (a PPO recipe "
                         "with a value head); GRPO has none: use 'grpo' or 'rloo'")
    return ADVANTAGE_ESTIMATORS[name](rewards, mask, **kwargs)


@register_advantage_estimator("grpo")
def _grpo(rewards, mask, *, group_size, scale_rewards="group", **_):
    del mask
    return group_advantages(rewards, group_size, scale_rewards)


@functools.partial(jax.jit, static_argnames=("group_size", "scale_rewards", "eps"))
def rloo_advantages(rewards: jax.Array, group_size: int, scale_rewards: str = "none",
                    eps: float = ADVANTAGE_EPS) -> tuple[jax.Array, dict[str, jax.Array]]:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024), as TRL 1.16's RLOOTrainer.

    `A_i = r_i - mean_{j != i} r_j` over the scored rows of i's group (`(sum - r_i) / (k - 1)`
    with `k` scored rows; a group with fewer than two gets 0). `scale_rewards="none"` keeps
    that (TRL's default); `"batch"` standardises over the whole batch, `(A - mean A) / (std A
    + eps)` (TRL's `normalize_advantages=True`); `"group"` divides by the group's reward std
    plus eps, as GRPO does. Stds are unbiased (ddof = 1), means and stds NaN-aware.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}; expected one of {SCALE_REWARDS}")
    rewards = jnp.asarray(rewards, jnp.float32)
    n = rewards.shape[0]
    if rewards.ndim != 1 or group_size < 1 or n % group_size:
        raise ValueError(f"rewards of shape {rewards.shape} cannot be split into groups of "
                         f"group_size={group_size}")
    r = rewards.reshape(-1, group_size)
    valid = ~jnp.isnan(r)
    k = jnp.sum(valid, axis=1, keepdims=True).astype(jnp.float32)
    rz = jnp.where(valid, r, 0.0)
    baseline = (jnp.sum(rz, axis=1, keepdims=True) - rz) / jnp.maximum(k - 1.0, 1.0)
    ok = valid & (k >= 2)
    adv = jnp.where(ok, r - baseline, 0.0)
    _, group_std = _nan_mean_std(r, valid, axis=1)
    if scale_rewards == "group":
        adv = adv / (group_std[:, None] + eps)
        std_used = jnp.mean(jnp.broadcast_to(group_std[:, None], r.shape))
    elif scale_rewards == "batch":
        mean_a, std_a = _nan_mean_std(adv.reshape(-1), ok.reshape(-1), axis=0)
        adv = jnp.where(ok, (adv - mean_a) / (std_a + eps), 0.0)
        std_used = std_a
    else:
        std_used = jnp.mean(jnp.broadcast_to(group_std[:, None], r.shape))
    hi = jnp.max(jnp.where(valid, r, -jnp.inf), axis=1)
    lo = jnp.min(jnp.where(valid, r, jnp.inf), axis=1)
    num_valid = jnp.sum(valid)
    stats = {"frac_reward_zero_std": jnp.mean(((k[:, 0] < 2) | (hi == lo)).astype(jnp.float32)),
             "reward_mean": jnp.sum(rz) / jnp.maximum(num_valid, 1),
             "reward_std": std_used,
             "frac_reward_none": 1.0 - num_valid / n}
    return adv.reshape(n), stats


@register_advantage_estimator("rloo")
def _rloo(rewards, mask, *, group_size, scale_rewards="none", **_):
    del mask
    return rloo_advantages(rewards, group_size, scale_rewards)


@register_advantage_estimator("gae", needs_values=True)
def _gae(rewards, mask, *, token_rewards=None, values=None, gamma=1.0, lam=1.0,
         whiten_advantages=True, **_):
    """GAE over per-token rewards (`token_rewards`, or the sequence reward on the last token)."""
    if token_rewards is None:
        token_rewards = ppo.token_rewards(jnp.zeros_like(values), mask, 0.0,
                                          scores=jnp.nan_to_num(jnp.asarray(rewards)))
    adv, returns = ppo.gae(token_rewards, values, mask, gamma, lam)
    if whiten_advantages:
        adv = ppo.whiten(adv, mask)
    m = jnp.asarray(mask) > 0
    mean, var = ppo.masked_mean_var(adv, m)
    return adv, {"returns": returns, "advantages_mean": mean, "advantages_std": jnp.sqrt(var)}
