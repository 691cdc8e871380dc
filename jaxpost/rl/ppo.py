"""PPO maths over per-token rewards: KL penalties, GAE, whitening, the clipped value loss,
and the adaptive KL controller.

Pure `jax.numpy` functions, the PPO counterpart of `jaxpost.rl.grpo` (whose clipped policy
surrogate PPO reuses). They follow TRL's `PPOTrainer` conventions (Ziegler et al. 2019,
"Fine-Tuning Language Models from Human Preferences"; Huang et al. 2024, "The N+ Implementation
Details of RLHF with PPO") so that numbers compare one to one:

- `kl_per_token`: the k1 (`logp - ref`) or k3 (`e^(ref-logp) - (ref-logp) - 1`) estimate.
- `token_rewards`: a sequence score placed on the last valid token, or an already distributed
  `[N, T]` score (`jaxpost.rl.gaze.distribute_reward`), minus `beta * kl` on every token.
- `gae`: generalised advantage estimation over completion tokens, exactly as the public
  contract states it (ARCHITECTURE.md, "PPO").
- `whiten`: masked standardisation (padding neither counts nor changes).
- `value_loss`: the clipped value loss and its clip fraction as `(sum, count)` pairs for
  `jaxpost.train.step`.
- `explained_variance`, `adaptive_kl_coef`: the diagnostics and the KL controller.

Shapes: `N` rows (completions), `T` completion positions; `mask[N, T]` is 1.0 on completion
tokens and 0.0 on padding. Rows are expected to be left-aligned (valid tokens first), but the
recursions skip masked positions, so a hole inside a row is passed over rather than cutting it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

#: `kl_per_token(estimator=...)` values.
KL_ESTIMATORS = ("k1", "k3")


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


@functools.partial(jax.jit, static_argnames=("estimator",))
def kl_per_token(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array,
                 estimator: str = "k1") -> jax.Array:
    """Per-token KL(pi || pi_ref) estimate on the sampled tokens, 0 on padding.

    `k1 = logp - ref_logp` (unbiased, can be negative; TRL PPO's default `kl_estimator="k1"`),
    `k3 = exp(ref - logp) - (ref - logp) - 1` (Schulman's non-negative, unbiased estimator; the
    one GRPO uses). Both are taken under stop-gradient by the callers that turn them into rewards.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={estimator!r}; expected one of {KL_ESTIMATORS}")
    keep = jnp.asarray(mask) > 0
    lp = jnp.where(keep, _f32(logp), 0.0)
    ref = jnp.where(keep, _f32(ref_logp), 0.0)
    if estimator == "k1":
        kl = lp - ref
    else:
        x = ref - lp
        kl = jnp.exp(x) - x - 1.0
    return jnp.where(keep, kl, 0.0)


def last_token_index(mask: jax.Array) -> jax.Array:
    """`[N]` index of each row's last valid token (0 for a row with none)."""
    m = jnp.asarray(mask) > 0
    t = jnp.arange(m.shape[-1])
    return jnp.max(jnp.where(m, t, 0), axis=-1)


@jax.jit
def token_rewards(kl: jax.Array, mask: jax.Array, beta: jax.Array | float,
                  scores: jax.Array | None = None,
                  score_tokens: jax.Array | None = None) -> jax.Array:
    """Per-token PPO rewards `r_t = score_t - beta * kl_t`, 0 on padding.

    The score enters either as a sequence score `scores [N]` on each row's last valid token
    (TRL's convention) or already spread over the tokens, `score_tokens [N, T]` (GazeDistrib:
    `jaxpost.rl.gaze.distribute_reward`); exactly one of the two must be given. `beta` may be
    a traced scalar (the adaptive KL controller's coefficient). `kl` is treated as a constant.
    """
    if (scores is None) == (score_tokens is None):
        raise ValueError("token_rewards needs exactly one of scores [N] (placed on the last "
                         "token) and score_tokens [N, T] (already distributed)")
    m = jnp.asarray(mask).astype(jnp.float32)
    if score_tokens is None:
        s = _f32(scores)
        if s.shape != m.shape[:1]:
            raise ValueError(f"scores has shape {s.shape}; expected [N] = {m.shape[:1]}")
        onehot = jax.nn.one_hot(last_token_index(m), m.shape[-1], dtype=jnp.float32)
        score_tokens = s[:, None] * onehot * (jnp.sum(m, -1, keepdims=True) > 0)
    elif jnp.shape(score_tokens) != m.shape:
        raise ValueError(f"score_tokens has shape {jnp.shape(score_tokens)}; expected the mask "
                         f"shape {m.shape}")
    r = _f32(score_tokens) - _f32(beta) * jax.lax.stop_gradient(_f32(kl))
    return jnp.where(m > 0, r, 0.0)


@functools.partial(jax.jit, static_argnames=("gamma", "lam"))
def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016) over completion tokens.

    `delta_t = r_t + gamma * V_{t+1} - V_t` with `V = 0` after a row's last valid token,
    `A_t = delta_t + gamma * lam * A_{t+1}`, `returns = A + V`; padding gets 0 in both. "Next"
    means the next *valid* position (a reverse `lax.scan` that carries the last valid value and
    advantage), so padding between tokens is skipped. No whitening here (see `whiten`); values
    and rewards are constants (stop-gradient).

    Args:
        rewards: float `[N, T]` per-token rewards (`token_rewards`).
        values: float `[N, T]` value estimates of the sampling-time critic.
        mask: `[N, T]`.
        gamma, lam: discount and GAE lambda (Python floats, static).

    Returns:
        `(advantages, returns)`, float32 `[N, T]`.
    """
    m = jnp.asarray(mask) > 0
    if jnp.shape(rewards) != m.shape or jnp.shape(values) != m.shape:
        raise ValueError(f"rewards {jnp.shape(rewards)}, values {jnp.shape(values)} and mask "
                         f"{m.shape} must have the same [N, T] shape")
    r = jnp.where(m, jax.lax.stop_gradient(_f32(rewards)), 0.0)
    v = jnp.where(m, jax.lax.stop_gradient(_f32(values)), 0.0)

    def step(carry, xs):
        next_v, next_a = carry
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_v - v_t
        a_t = delta + gamma * lam * next_a
        carry = (jnp.where(m_t, v_t, next_v), jnp.where(m_t, a_t, next_a))
        return carry, jnp.where(m_t, a_t, 0.0)

    zeros = jnp.zeros(m.shape[:1], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, m.T), reverse=True)
    adv = adv.T
    return adv, jnp.where(m, adv + v, 0.0)


def masked_mean_var(x: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked mean and unbiased (n / (n - 1)) variance, as TRL's `masked_var`."""
    n = jnp.sum(m)
    mean = jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.where(m, (x - mean) ** 2, 0.0)) / jnp.maximum(n - 1.0, 1.0)
    return mean, var


@functools.partial(jax.jit, static_argnames=("shift_mean",))
def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True,
           eps: float = 1e-8) -> jax.Array:
    """`(x - mean) / sqrt(var + eps)` over the valid entries only; padding stays 0.

    The statistics are over every valid entry of the batch (TRL's `masked_whiten`: unbiased
    variance); with `shift_mean=False` the mean is added back (TRL whitens rewards that way).
    """
    m = jnp.asarray(mask) > 0
    x = _f32(x)
    mean, var = masked_mean_var(x, m)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m, out, 0.0)


@functools.partial(jax.jit, static_argnames=("clip_range_value",))
def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               clip_range_value: float = 0.2,
               ) -> tuple[jax.Array, jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """The clipped value loss, `0.5 * max((V - R)^2, (clip(V, V_old +- c) - R)^2)`.

    As TRL's `PPOTrainer` (its `cliprange_value`, default 0.2): the new value may move at most
    `c` from the sampling-time value before the clipped branch takes over. Returned in the
    train step's objective shape, `(loss_sum, token_count, aux)`, so gradient accumulation
    gives the token mean over the whole optimizer step; `aux["value_clipfrac"]` is the fraction
    of tokens where the clipped branch is the larger.
    """
    m = jnp.asarray(mask) > 0
    v = jnp.where(m, _f32(values), 0.0)
    old = jax.lax.stop_gradient(jnp.where(m, _f32(old_values), 0.0))
    ret = jax.lax.stop_gradient(jnp.where(m, _f32(returns), 0.0))
    v_clip = old + jnp.clip(v - old, -clip_range_value, clip_range_value)
    l1 = (v - ret) ** 2
    l2 = (v_clip - ret) ** 2
    per_tok = 0.5 * jnp.maximum(l1, l2)
    mf = m.astype(jnp.float32)
    count = jnp.sum(mf)
    aux = {"value_clipfrac": (jnp.sum(jnp.where(m, (l2 > l1).astype(jnp.float32), 0.0)), count)}
    return jnp.sum(jnp.where(m, per_tok, 0.0)), count, aux


@jax.jit
def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """`1 - Var(returns - values) / Var(returns)` over the valid tokens (1: perfect critic,
    0: no better than a constant, negative: worse). NaN if the returns have no variance."""
    m = jnp.asarray(mask) > 0
    _, var_r = masked_mean_var(_f32(returns), m)
    _, var_d = masked_mean_var(_f32(returns) - _f32(values), m)
    return 1.0 - var_d / var_r


def adaptive_kl_coef(beta: jax.Array | float, current_kl: jax.Array | float, n_steps: int,
                     target: float, horizon: float) -> jax.Array:
    """One update of the adaptive KL controller of Ziegler et al. (2019).

    `e = clip(KL / target - 1, -0.2, 0.2)`, `beta <- beta * (1 + e * n_steps / horizon)`:
    beta grows when the policy drifts past the target KL and shrinks below it, at a rate set by
    the horizon (in samples; `n_steps` is the batch size of this update). Pure: the coefficient
    lives in the train state so that a resumed run continues the same schedule.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, "
                         f"horizon={horizon}")
    err = jnp.clip(_f32(current_kl) / target - 1.0, -0.2, 0.2)
    return _f32(beta) * (1.0 + err * n_steps / horizon)
