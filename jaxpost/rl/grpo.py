"""GRPO maths: group-relative advantages, the clipped per-token loss, and its aggregation.

Small pure `jax.numpy` functions with no host state. They are wrapped in `jax.jit` (options
such as `group_size`, `loss_type`, `epsilon` and `beta` are static arguments: Python
values, one compilation per distinct value), so a host-side call compiles once instead of
dispatching op by op, and inside another jitted function they simply inline. They mirror TRL's
`GRPOTrainer` (TRL main, 1.10.0.dev0; see ALGORITHMS.md 4.4) so that numbers can be
compared one to one:

- `group_advantages`: `A = r - mean_group(r)`, optionally divided by an unbiased
  (ddof = 1) group or batch std plus `1e-4`.
- `token_advantages`: a sequence advantage broadcast over its completion tokens, or
  spread by per-token credit weights (gaze, for example; the host-side interface that
  produces them is `jaxpost.rl.credit`) as weights or as a reward-to-go.
- `per_token_loss`: `-min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A)` with an optional
  `delta` cap on `rho` and an optional `beta`-weighted k3 KL to a reference policy.
- `aggregate`: per-token losses -> a `(loss_sum, count)` pair for `jaxpost.train.step`,
  whose gradient-accumulation loop sums both over micro-batches and divides once.
  `LOSS_TYPES` holds one tiny function per variant (`grpo`, `bnpo`, `dr_grpo`, `dapo`);
  `register_loss_type` adds one.
- `policy_loss`: `per_token_loss` + `aggregate` in one call, returning `(loss_sum, count, aux)` with the
  clip fractions (and KL) as `(sum, weight)` metric pairs.
- `masked_mean_pair`, `token_entropy`: metric helpers.

Shapes: `N` rows (completions) grouped contiguously by prompt, `N = num_prompts * G`;
`T` completion positions; `mask[N, T]` is 1.0 on completion tokens that enter the loss
and 0.0 on padding, tokens after EOS and masked-out (e.g. truncated) completions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

#: Values accepted by `group_advantages(scale_rewards=...)`.
SCALE_REWARDS = ("group", "batch", "none")

#: The log-ratio `logp - old_logp` is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before
#: `exp`, so that a wild ratio cannot overflow to inf (and then NaN in the gradient).
#: e^20 ~ 4.9e8 is far beyond any ratio the clip lets through, so in practice the clamp never
#: changes a value; where it does bind, the clamped token gets no gradient through the ratio.
#: TRL's main GRPO path does not clamp (some of its importance-sampling helpers clamp to
#: the same +-20).
LOG_RATIO_CLAMP = 20.0

#: Denominator guard of the reward normalisation, `A / (std + ADVANTAGE_EPS)` (TRL's 1e-4).
ADVANTAGE_EPS = 1e-4


# ------------------------------------------------------------------------------ advantages
@functools.partial(jax.jit, static_argnames=("group_size", "scale_rewards", "eps"))
def group_advantages(rewards: jax.Array, group_size: int, scale_rewards: str = "group",
                     eps: float = ADVANTAGE_EPS) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Group-relative advantages of GRPO, exactly as TRL computes them, NaN-aware.

    `A_i = r_i - mean(r over i's group)`; with `scale_rewards="group"` (DeepSeekMath GRPO)
    it is then divided by `std(group) + eps`, with `"batch"` (Lite PPO) by
    `std(whole batch) + eps`, and with `"none"` (Dr. GRPO) not at all. Every std is the
    unbiased (Bessel-corrected, ddof = 1) one; a set of fewer than two rewards has std 0
    (so `group_size == 1` gives std 0, as in TRL).

    A NaN reward marks a row to which no reward function applied (every function returned
    None). It is left out of the mean and std of its group (and of the batch), and its
    advantage is 0, so it contributes no policy gradient.

    Args:
        rewards: float `[N]` total reward per completion; `N = num_prompts * group_size`,
            rows of one prompt contiguous.
        group_size: G, completions per prompt (static).
        scale_rewards: "group", "batch" or "none" (static).
        eps: added to the std before dividing.

    Returns:
        `(advantages, stats)`: float32 `[N]` advantages and a dict of float32 scalars:
        `frac_reward_zero_std` (fraction of groups whose valid rewards are all equal, or
        that have fewer than two of them: such a group has zero advantage and, but for
        the KL term, no gradient; DAPO's dynamic sampling drops it), `reward_mean` (mean of
        the valid rewards), `reward_std` (TRL's `reward_std`: the std used for scaling,
        averaged over rows, i.e. the batch std for "batch" and the mean group std
        otherwise), `frac_reward_none` (fraction of NaN rows).

    Raises:
        ValueError: if `scale_rewards` is unknown, `group_size < 1`, or `N` is not a
            multiple of `group_size`.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}; expected one of {SCALE_REWARDS}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {rewards.shape}")
    n = rewards.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rewards cannot be split into groups of group_size={group_size};"
                         " N must be num_prompts * group_size")
    r = rewards.reshape(-1, group_size)
    valid = ~jnp.isnan(r)
    group_mean, group_std = _nan_mean_std(r, valid, axis=1)
    adv = jnp.where(valid, r - group_mean[:, None], 0.0)
    if scale_rewards == "batch":
        batch_mean, batch_std = _nan_mean_std(rewards, ~jnp.isnan(rewards), axis=0)
        del batch_mean
        std_rows = jnp.full(r.shape, batch_std)
    else:
        std_rows = jnp.broadcast_to(group_std[:, None], r.shape)
    if scale_rewards != "none":
        adv = adv / (std_rows + eps)

    rz = jnp.where(valid, r, 0.0)
    hi = jnp.max(jnp.where(valid, r, -jnp.inf), axis=1)
    lo = jnp.min(jnp.where(valid, r, jnp.inf), axis=1)
    zero_std = (jnp.sum(valid, axis=1) < 2) | (hi == lo)
    num_valid = jnp.sum(valid)
    stats = {
        "frac_reward_zero_std": jnp.mean(zero_std.astype(jnp.float32)),
        "reward_mean": jnp.sum(rz) / jnp.maximum(num_valid, 1),
        "reward_std": jnp.mean(std_rows),
        "frac_reward_none": 1.0 - num_valid / n,
    }
    return adv.reshape(n), stats


def _nan_mean_std(x: jax.Array, valid: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Mean and unbiased std over `axis` of the entries where `valid`; std 0 if < 2."""
    cnt = jnp.sum(valid, axis=axis).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, x, 0.0), axis=axis) / jnp.maximum(cnt, 1.0)
    dev = jnp.where(valid, x - jnp.expand_dims(mean, axis), 0.0)
    var = jnp.sum(dev * dev, axis=axis) / jnp.maximum(cnt - 1.0, 1.0)
    return mean, jnp.where(cnt >= 2, jnp.sqrt(var), 0.0)


#: Values of `token_advantages(mode=...)` (the recipe key `token_credit_mode`).
CREDIT_MODES = ("weighted", "reward_to_go")


def token_advantages(seq_advantages: jax.Array, completion_mask: jax.Array,
                     credit: jax.Array | None = None, mode: str = "weighted") -> jax.Array:
    """Per-token advantages: the sequence advantage spread over its completion tokens.

    `credit` is a float `[N, T]` array of non-negative per-token weights (what a
    token-credit function returns, `jaxpost.rl.credit`; only each row's shape matters,
    it is normalised here; a row whose valid weights sum to 0 counts as uniform), or None
    (uniform). `mode` says how weights and the sequence advantage `A_i` become `A_{i,t}`:

    - `"weighted"` (default): `A_{i,t} = A_i * w~_{i,t}` with `w~` rescaled to masked mean
      1 (`normalize_credit`). The row's total advantage mass, and so the loss scale, stay
      those of plain GRPO; only the distribution over tokens changes. Uniform credit is
      plain GRPO.
    - `"reward_to_go"`: the advantage is spread as a token reward `a_{i,t} = A_i * p_{i,t}`
      with `p` rescaled to sum 1 over valid tokens (GazeDistrib applied to `A_i`), then
      `A_{i,t} = sum_{k >= t} a_{i,k}`. Equivalently the return-to-go of the
      GazeDistrib rewards of `R_i`, normalised with the group statistics of R (the group
      mean spread with the same weights as the baseline): `(G_{i,t} - mu_g F_{i,t}) /
      (sigma_g + eps)`, `F_{i,t} = sum_{k >= t} p_{i,k}` (ALGORITHMS.md 2.2's proposal
      [U]). The first token gets `A_i`, later tokens the part of it not yet "spent", so
      the mean magnitude is below plain GRPO's.

    Masked positions get 0. Traceable (callable inside jit; `mode` must be a Python str).
    Additive schemes (TEMPO's `z_i + lambda * delta_{i,t}`) compute their own `[N, T]`
    advantages and pass them straight to `per_token_loss`.

    Args:
        seq_advantages: float `[N]` (from `group_advantages`).
        completion_mask: `[N, T]`, 1 on completion tokens in the loss.
        credit: None or non-negative weights `[N, T]`.
        mode: one of `CREDIT_MODES`.

    Returns:
        float32 `[N, T]`, zero where the mask is 0.

    Raises:
        ValueError: if shapes disagree or `mode` is unknown.
    """
    if mode not in CREDIT_MODES:
        raise ValueError(f"token credit mode {mode!r}; expected one of {CREDIT_MODES}")
    adv = jnp.asarray(seq_advantages, jnp.float32)
    mask = jnp.asarray(completion_mask).astype(jnp.float32)
    if adv.ndim != 1 or mask.ndim != 2 or mask.shape[0] != adv.shape[0]:
        raise ValueError(f"expected seq_advantages [N] and completion_mask [N, T], got "
                         f"{adv.shape} and {mask.shape}")
    if credit is None:
        if mode == "weighted":
            return adv[:, None] * mask
        credit = mask
    weights = jnp.asarray(credit, jnp.float32)
    if weights.shape != mask.shape:
        raise ValueError(f"credit weights have shape {weights.shape}; expected the "
                         f"completion_mask shape {mask.shape}")
    w = normalize_credit(weights, mask)
    if mode == "weighted":
        return jnp.where(mask > 0, adv[:, None] * w, 0.0)
    p = w / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)  # sums to 1 per row
    remaining = jnp.flip(jnp.cumsum(jnp.flip(p, -1), axis=-1), -1)
    return jnp.where(mask > 0, adv[:, None] * remaining, 0.0)


def normalize_credit(weights: jax.Array, mask: jax.Array) -> jax.Array:
    """Rescales non-negative `[N, T]` weights so each row has masked mean 1.

    A row whose masked weights sum to 0 (or that has no tokens) becomes uniform 1, so it
    falls back to plain GRPO credit. Masked positions become 0.
    """
    mask = jnp.asarray(mask).astype(jnp.float32)
    w = jnp.asarray(weights, jnp.float32) * mask
    total = jnp.sum(w, axis=-1, keepdims=True)
    count = jnp.sum(mask, axis=-1, keepdims=True)
    scaled = w * count / jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, scaled, mask)


# -------------------------------------------------------------------------- per-token loss
@functools.partial(jax.jit, static_argnames=("epsilon", "epsilon_high", "beta", "delta"))
def per_token_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                   mask: jax.Array, *, epsilon: float = 0.2, epsilon_high: float | None = None,
                   beta: float = 0.0, ref_logp: jax.Array | None = None,
                   delta: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped surrogate (plus KL) per token, as TRL's `_compute_loss` computes it.

    ```
    rho    = exp(clamp(logp - old_logp, +-LOG_RATIO_CLAMP))
    rho_c  = clip(rho, 1 - epsilon, 1 + epsilon_high)
    rho    = min(rho, delta)                       if delta is not None
    loss   = -min(rho * A, rho_c * A) + beta * (exp(ref - logp) - (ref - logp) - 1)
    ```
    `old_logp` and `ref_logp` are wrapped in `stop_gradient` here. With one policy update
    per generation batch (`num_iterations == 1`) pass `old_logp = logp`: the ratio is then
    exactly 1 in value and the gradient is that of `-A * logp`.

    Args:
        logp: float `[N, T]` log-probs of the sampled tokens under the current policy.
        old_logp: `[N, T]` log-probs under the policy that sampled them.
        advantages: `[N]` (broadcast over tokens) or `[N, T]` (from `token_advantages`).
        mask: `[N, T]`, 1 on tokens in the loss; the returned loss is 0 elsewhere (even if
            `logp` is not finite there).
        epsilon: lower clip range, epsilon_low (0.2).
        epsilon_high: upper clip range; None means `epsilon` (DAPO Clip-Higher: 0.28).
        beta: KL coefficient, a Python float (static); 0 adds no KL term (TRL's default).
        ref_logp: `[N, T]` reference-policy log-probs; required if `beta != 0`.
        delta: optional cap on the unclipped ratio (INTELLECT-2's two-sided clip; bounds
            the loss for negative advantages); should exceed `1 + epsilon_high`.

    Returns:
        `(loss, metrics)`: float32 `[N, T]` per-token loss and float32 `[N, T]` metrics to
        average with `masked_mean_pair`, all 0 where mask is 0: `is_low_clipped`
        (`rho < 1 - epsilon` and `A < 0`), `is_high_clipped` (`rho > 1 + epsilon_high` and
        `A > 0`), `is_region_clipped` (either), and `kl` (the k3 estimate, present only
        when `ref_logp` is given). The clip indicators use the ratio before the `delta`
        cap.

    Raises:
        ValueError: if `beta != 0` without `ref_logp`, or on a bad clip range.
    """
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    if not (0.0 <= eps_low < 1.0) or eps_high < 0.0:
        raise ValueError(f"need 0 <= epsilon < 1 and epsilon_high >= 0, got epsilon={epsilon}, "
                         f"epsilon_high={epsilon_high}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (reference-policy log-probs); pass them "
                         "or set beta=0")
    keep = jnp.asarray(mask) > 0
    # Zero the inputs at masked positions (padding may hold -inf log-probs) so that no
    # inf/NaN arises there, not even in the gradient of the discarded branch of `where`.
    logp = jnp.where(keep, jnp.asarray(logp, jnp.float32), 0.0)
    old = jax.lax.stop_gradient(jnp.where(keep, jnp.asarray(old_logp, jnp.float32), 0.0))
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.ndim == 1:
        adv = adv[:, None]

    log_ratio = jnp.clip(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    coef_1 = jnp.exp(log_ratio)
    coef_2 = jnp.clip(coef_1, 1.0 - eps_low, 1.0 + eps_high)
    capped = coef_1 if delta is None else jnp.minimum(coef_1, float(delta))
    loss = -jnp.minimum(capped * adv, coef_2 * adv)

    low = (coef_1 < 1.0 - eps_low) & (adv < 0) & keep
    high = (coef_1 > 1.0 + eps_high) & (adv > 0) & keep
    metrics = {"is_low_clipped": low.astype(jnp.float32),
               "is_high_clipped": high.astype(jnp.float32),
               "is_region_clipped": (low | high).astype(jnp.float32)}
    if ref_logp is not None:
        ref = jnp.where(keep, jnp.asarray(ref_logp, jnp.float32), 0.0)
        x = jax.lax.stop_gradient(ref) - logp
        kl = jnp.exp(x) - x - 1.0
        metrics["kl"] = jnp.where(keep, kl, 0.0)
        if beta != 0.0:
            loss = loss + beta * kl
    return jnp.where(keep, loss, 0.0), metrics


# ----------------------------------------------------------------------------- aggregation
#: `fn(masked_loss [N, T], mask [N, T], max_completion_length) -> (loss_sum, count)`.
LossAggregator = Callable[[jax.Array, jax.Array, "int | None"], tuple[jax.Array, jax.Array]]

#: Aggregations by name (`loss_type`); see `aggregate`. Add one with `register_loss_type`.
LOSS_TYPES: dict[str, LossAggregator] = {}


def register_loss_type(name: str) -> Callable[[LossAggregator], LossAggregator]:
    """Decorator registering `fn(masked_loss, mask, max_completion_length) -> (sum, count)`.

    `masked_loss` is already zero on masked positions. The pair must be such that summing
    it over gradient-accumulation micro-batches and dividing gives the intended loss.
    Register at import time, before `aggregate` first runs with that name (jit caches the
    traced function by `loss_type`).
    """
    def register(fn: LossAggregator) -> LossAggregator:
        if name in LOSS_TYPES:
            raise ValueError(f"loss_type {name!r} is already registered")
        LOSS_TYPES[name] = fn
        return fn
    return register


@register_loss_type("grpo")
def _grpo(lm, m, max_completion_length):
    # Mean over sequences of per-sequence token means (DeepSeekMath's 1/|o_i|).
    del max_completion_length
    per_seq = jnp.sum(lm, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return jnp.sum(per_seq), jnp.asarray(lm.shape[0], jnp.float32)


@register_loss_type("bnpo")
def _bnpo(lm, m, max_completion_length):
    # Token mean of each micro-batch, then the mean over micro-batches.
    del max_completion_length
    return jnp.sum(lm) / jnp.maximum(jnp.sum(m), 1.0), jnp.ones((), jnp.float32)


@register_loss_type("dr_grpo")
def _dr_grpo(lm, m, max_completion_length):
    # Token sum over a constant: sequences x the generation budget (Dr. GRPO).
    del m
    if max_completion_length is None or max_completion_length <= 0:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length > 0 (the generation "
                         f"budget it divides by), got {max_completion_length!r}")
    return (jnp.sum(lm) / float(max_completion_length),
            jnp.asarray(lm.shape[0], jnp.float32))


@register_loss_type("dapo")
def _dapo(lm, m, max_completion_length):
    # Token sum over the number of loss tokens of the whole optimizer step (DAPO).
    del max_completion_length
    return jnp.sum(lm), jnp.sum(m)


@functools.partial(jax.jit, static_argnames=("loss_type", "max_completion_length"))
def aggregate(loss: jax.Array, mask: jax.Array, loss_type: str = "dapo",
              max_completion_length: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-token losses -> `(loss_sum, count)` for the train step's accumulation.

    `jaxpost.train.step` sums `loss_sum` and `count` over the gradient-accumulation
    micro-batches of one optimizer step and divides once (`count` clamped to >= 1). With
    `l = loss * mask`, `m = mask` and `n` rows per micro-batch, each type's pair and the
    resulting loss of the whole step (`N` rows in all) are:

    - `grpo`: `(sum_i sum_t l / max(sum_t m, 1), n)` -> the mean over all N sequences of
      each sequence's token mean. TRL takes the mean per micro-batch and divides by the
      accumulation steps: the same when micro-batches are equal in size.
    - `bnpo`: `(sum l / max(sum m, 1), 1)` -> the mean over micro-batches of each
      micro-batch's token mean; this one depends on how the batch is split (TRL divides
      each micro-batch's token mean by the accumulation steps; and since jaxpost's
      micro-batch is global, not per process, it equals TRL's with one process).
    - `dr_grpo`: `(sum l / max_completion_length, n)` -> `sum l / (N * L_max)`. TRL
      divides the per-micro-batch value by the accumulation steps: the same for equal
      micro-batches.
    - `dapo`: `(sum l, sum m)` -> `sum l / sum m` over all micro-batches, i.e. normalised
      by the global token count. TRL gets the same by dividing by the token count across
      processes and accumulation steps, over `num_processes`.

    A row with no tokens contributes 0 and never NaN.

    Args:
        loss: float `[N, T]` per-token loss (from `per_token_loss`).
        mask: `[N, T]` loss mask.
        loss_type: a key of `LOSS_TYPES` (static).
        max_completion_length: the generation budget L_max; needed by `dr_grpo`.

    Returns:
        float32 scalars `(loss_sum, count)`.

    Raises:
        ValueError: on an unknown `loss_type` or a missing `max_completion_length`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {sorted(LOSS_TYPES)}")
    m = jnp.asarray(mask).astype(jnp.float32)
    lm = jnp.where(m > 0, jnp.asarray(loss, jnp.float32) * m, 0.0)
    s, c = LOSS_TYPES[loss_type](lm, m, max_completion_length)
    return jnp.asarray(s, jnp.float32), jnp.asarray(c, jnp.float32)


@functools.partial(jax.jit, static_argnames=("loss_type", "max_completion_length", "epsilon",
                                             "epsilon_high", "beta", "delta"))
def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                *, loss_type: str = "dapo", max_completion_length: int | None = None,
                epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                ref_logp: jax.Array | None = None, delta: float | None = None,
                ) -> tuple[jax.Array, jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """`per_token_loss` + `aggregate` + token metrics, in the objective contract's shape.

    Returns `(loss_sum, count, aux)` ready to be returned by a `loss_fn` for
    `jaxpost.train.step`; `aux` maps `clip_ratio/low_mean`, `clip_ratio/high_mean`,
    `clip_ratio/region_mean` (and `kl` when `ref_logp` is given) to `(sum, token count)`
    pairs, i.e. token means over the whole optimizer step, as TRL logs them. Arguments
    as in `per_token_loss` and `aggregate`.
    """
    loss, tok = per_token_loss(logp, old_logp, advantages, mask, epsilon=epsilon,
                               epsilon_high=epsilon_high, beta=beta, ref_logp=ref_logp,
                               delta=delta)
    loss_sum, count = aggregate(loss, mask, loss_type, max_completion_length)
    aux = {"clip_ratio/low_mean": masked_mean_pair(tok["is_low_clipped"], mask),
           "clip_ratio/high_mean": masked_mean_pair(tok["is_high_clipped"], mask),
           "clip_ratio/region_mean": masked_mean_pair(tok["is_region_clipped"], mask)}
    if "kl" in tok:
        aux["kl"] = masked_mean_pair(tok["kl"], mask)
    return loss_sum, count, aux


# --------------------------------------------------------------------------------- metrics
@jax.jit
def masked_mean_pair(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(sum(values * mask), sum(mask))`: a masked mean as a train-step aux pair.

    The train step sums such pairs over micro-batches and divides once, giving the mean
    over every masked-in entry of the optimizer step. Entries where `mask` is 0 are
    ignored even if not finite.
    """
    m = jnp.asarray(mask).astype(jnp.float32)
    v = jnp.where(m > 0, jnp.asarray(values, jnp.float32) * m, 0.0)
    return jnp.sum(v), jnp.sum(m)


@jax.jit
def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy (nats) of the next-token distribution, in float32: `[..., V] -> [...]`.

    Slice the logits like the log-probs (`logits[:, :-1]` for the targets `tokens[:, 1:]`)
    and average with `masked_mean_pair` for the `entropy` metric. `-inf` logits (banned
    tokens) are fine.
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
