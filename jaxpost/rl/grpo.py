"""GRPO maths: group-relative advantages, the per-token loss of each loss type, and its
aggregation.

Small pure `jax.numpy` functions with no host state. They are wrapped in `jax.jit` (options
such as `group_size`, `loss_type`, `epsilon` and `beta` are static arguments: Python
values, one compilation per distinct value), so a host-side call compiles once instead of
dispatching op by op, and inside another jitted function they simply inline. They mirror
TRL 1.16's `GRPOTrainer` (`_compute_loss` and its advantage block) so that numbers can be
compared one to one (tests/rl/test_trl_parity.py runs TRL itself):

- `group_advantages`: `A = r - mean_group(r)`, optionally divided by an unbiased
  (ddof = 1) group or batch std plus `1e-4`; `decoupled_advantages`: GDPO's per-reward
  group normalisation, weighted sum, then batch normalisation.
- `token_advantages`: a sequence advantage broadcast over its completion tokens, or
  spread by per-token credit weights (gaze, for example; the host-side interface that
  produces them is `jaxpost.rl.credit`) as weights or as a reward-to-go.
- `per_token_loss`: token- or sequence-level (GSPO) importance weights, the loss type's
  surrogate (`SURROGATES`: PPO's clipped one with TRL's `delta` cap; CISPO; SAPO; VESPO),
  the off-policy sequence mask and entropy mask, and a `beta`-weighted k3 KL to a
  reference policy, bias-corrected by the ratio (TRL's `use_bias_correction_kl`).
- `aggregate`: per-token losses -> a `(loss_sum, count)` pair for `jaxpost.train.step`,
  whose gradient-accumulation loop sums both over micro-batches and divides once.
  `LOSS_TYPES` holds one tiny function per variant (`grpo`, `bnpo`, `dr_grpo`, `dapo`,
  `cispo`, `sapo`, `luspo`, `vespo`); `register_loss_type(name, surrogate)` adds one.
- `policy_loss`: `per_token_loss` + `aggregate` (+ the top-entropy mask and the entropy
  bonus) in one call, returning `(loss_sum, count, aux)` with TRL's metrics as
  `(sum, weight)` pairs.
- `masked_mean_pair`, `token_entropy`, `high_entropy_mask`: metric and mask helpers.

Shapes: `N` rows (completions) grouped contiguously by prompt, `N = num_prompts * G`;
`T` completion positions; `mask[N, T]` is 1.0 on completion tokens that enter the loss
and 0.0 on padding, tokens after EOS and masked-out (e.g. truncated) completions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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


#: Values of `multi_objective_aggregation` (TRL's names).
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


@functools.partial(jax.jit, static_argnames=("group_size", "eps"))
def decoupled_advantages(rewards_per_func: jax.Array, weights: jax.Array, group_size: int,
                         eps: float = ADVANTAGE_EPS) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GDPO advantages (`multi_objective_aggregation="normalize_then_sum"`), as TRL 1.16:
    each reward function's rewards are normalised within their group,
    `(r_k - mean_group(r_k)) / (std_group(r_k) + eps)`, then weighted and summed, and the
    sum is normalised over the whole batch, `(s - mean(s)) / (std(s) + eps)`; every std
    unbiased. `scale_rewards` does not apply. NaN (a function that returned None) is
    left out of that function's statistics and counts 0 in the sum; a row where every
    function returned None has advantage 0.

    Args:
        rewards_per_func: float `[N, K]` raw rewards, NaN for None.
        weights: `[K]` reward weights.
        group_size: G (static).
        eps: added to each std.

    Returns:
        `(advantages [N], stats)` with `group_advantages`' stats keys:
        `frac_reward_zero_std` (groups where no function's rewards vary: such a group
        has zero advantage), `reward_mean` (of the weighted raw sum), `reward_std` (the
        batch std of the normalised sum) and `frac_reward_none`.
    """
    r = jnp.asarray(rewards_per_func, jnp.float32)
    if r.ndim != 2:
        raise ValueError(f"rewards_per_func must be [N, K], got shape {r.shape}")
    n, k = r.shape
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rewards cannot be split into groups of group_size={group_size}")
    w = jnp.asarray(weights, jnp.float32)
    grouped = r.reshape(-1, group_size, k)
    valid = ~jnp.isnan(grouped)
    mean_k, std_k = _nan_mean_std(grouped, valid, axis=1)
    norm = jnp.where(valid, (grouped - mean_k[:, None]) / (std_k[:, None] + eps), 0.0)
    summed = jnp.sum(norm * w, axis=-1).reshape(n)
    scorable = jnp.any(~jnp.isnan(r), axis=-1)
    mean, std = _nan_mean_std(summed, scorable, axis=0)
    adv = jnp.where(scorable, (summed - mean) / (std + eps), 0.0)
    hi = jnp.max(jnp.where(valid, grouped, -jnp.inf), axis=1)
    lo = jnp.min(jnp.where(valid, grouped, jnp.inf), axis=1)
    flat = (jnp.sum(valid, axis=1) < 2) | (hi == lo)  # [groups, K]
    raw = jnp.sum(jnp.where(jnp.isnan(r), 0.0, r) * w, axis=-1)
    num = jnp.sum(scorable)
    stats = {"frac_reward_zero_std": jnp.mean(jnp.all(flat, axis=-1).astype(jnp.float32)),
             "reward_mean": jnp.sum(jnp.where(scorable, raw, 0.0)) / jnp.maximum(num, 1),
             "reward_std": std,
             "frac_reward_none": 1.0 - num / n}
    return adv, stats


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
#: Values of `per_token_loss(importance_sampling_level=...)` (TRL's names).
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")

#: VESPO clamps its sequence log-weight from below at log(1e-8), as TRL does.
_VESPO_LOG_W_MIN = math.log(1e-8)


@dataclasses.dataclass(frozen=True)
class SurrogateInputs:
    """What a surrogate (the policy term of one loss type) sees, all float32.

    `coef_1` and `log_weights` are `[N, T]` at `importance_sampling_level="token"` and
    `[N, 1]` at `"sequence"`; `logp` is differentiable; `log_ratio` is the per-token
    `logp - old_logp` (clamped); `adv` is `[N, 1]` or `[N, T]`; `mask` `[N, T]`.
    `options` holds the static knobs (`epsilon`, `epsilon_high`, `delta`, `sapo_*`,
    `vespo_*`) as a dict."""

    coef_1: jax.Array
    logp: jax.Array
    log_ratio: jax.Array
    adv: jax.Array
    mask: jax.Array
    options: dict


#: `surrogate(SurrogateInputs) -> (policy loss [N, T] or [N, 1], metrics)`; a metric is
#: `[N, T]` (a token mean) or `[N, 1]` (a mean over rows), as TRL averages them.
SurrogateFn = Callable[[SurrogateInputs], tuple[jax.Array, dict[str, jax.Array]]]

#: Policy terms by name; `LOSS_SURROGATES[loss_type]` names the one a loss type uses.
SURROGATES: dict[str, SurrogateFn] = {}
LOSS_SURROGATES: dict[str, str] = {}


def _surrogate(name: str):
    def register(fn: SurrogateFn) -> SurrogateFn:
        SURROGATES[name] = fn
        return fn
    return register


@_surrogate("clip")
def _clipped(x: SurrogateInputs):
    """PPO's clipped surrogate `-min(rho A, clip(rho, 1-eps, 1+eps_high) A)`, rho capped
    at `delta` (INTELLECT-2) when set; the clip metrics."""
    o = x.options
    coef_2 = jnp.clip(x.coef_1, 1.0 - o["epsilon"], 1.0 + o["epsilon_high"])
    capped = x.coef_1 if o["delta"] is None else jnp.minimum(x.coef_1, o["delta"])
    loss = -jnp.minimum(capped * x.adv, coef_2 * x.adv)
    adv = _row_advantage(x.adv, x.mask) if x.coef_1.shape[-1] == 1 else x.adv
    low = (x.coef_1 < 1.0 - o["epsilon"]) & (adv < 0)
    high = (x.coef_1 > 1.0 + o["epsilon_high"]) & (adv > 0)
    return loss, {"is_low_clipped": low.astype(jnp.float32),
                  "is_high_clipped": high.astype(jnp.float32),
                  "is_region_clipped": (low | high).astype(jnp.float32)}


@_surrogate("cispo")
def _cispo(x: SurrogateInputs):
    """CISPO (MiniMax-M1): `-sg(min(rho, epsilon_high)) * A * logp`. As in TRL,
    `epsilon_high` is the absolute cap on the weight (ScaleRL recommends 5.0; unset it
    falls back to `epsilon`)."""
    cap = x.options["epsilon_high"]
    weight = jax.lax.stop_gradient(jnp.minimum(x.coef_1, cap))
    adv = _row_advantage(x.adv, x.mask) if x.coef_1.shape[-1] == 1 else x.adv
    clipped = (x.coef_1 > cap) & (adv > 0)
    return -weight * x.adv * x.logp, {"cispo_clip_ratio": clipped.astype(jnp.float32)}


@_surrogate("sapo")
def _sapo(x: SurrogateInputs):
    """SAPO's soft gate: `-(4 / tau) * sigmoid(tau * (rho - 1)) * A`, with
    `tau = sapo_temperature_pos` where `A > 0`, else `sapo_temperature_neg`; its
    gradient at rho = 1 equals the policy gradient's."""
    o = x.options
    tau = jnp.where(x.adv > 0, o["sapo_temperature_pos"], o["sapo_temperature_neg"])
    return -(jax.nn.sigmoid(tau * (x.coef_1 - 1.0)) * 4.0 / tau) * x.adv, {}


@_surrogate("vespo")
def _vespo(x: SurrogateInputs):
    """VESPO: `-sg(phi(w)) * A * logp` with the sequence weight `w = exp(sum_t log_ratio)`
    (clamped in log space to [log 1e-8, 20]) and the Gamma weighting
    `phi(w) = exp(lambda + k log w - lambda w)` (phi(1) = 1); `(k, lambda)` are
    `(vespo_k_pos, vespo_lambda_pos)` where `A >= 0` else the `_neg` pair."""
    o = x.options
    seq = jnp.sum(x.log_ratio * x.mask, axis=-1, keepdims=True)
    log_w = jax.lax.stop_gradient(jnp.clip(seq, _VESPO_LOG_W_MIN, LOG_RATIO_CLAMP))
    nonneg = _row_advantage(x.adv, x.mask) >= 0
    k = jnp.where(nonneg, o["vespo_k_pos"], o["vespo_k_neg"])
    lam = jnp.maximum(jnp.where(nonneg, o["vespo_lambda_pos"], o["vespo_lambda_neg"]), 1e-4)
    phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))
    phi = jnp.where(jnp.isfinite(phi), phi, 0.0)
    return -phi * x.adv * x.logp, {"phi_seq": phi}


def _row_advantage(adv: jax.Array, mask: jax.Array) -> jax.Array:
    """`[N, 1]` advantages: as given, or the masked mean of `[N, T]` token advantages
    (the sequence advantage when it is broadcast; same sign under non-negative credit
    weights)."""
    if adv.shape[-1] == 1:
        return adv
    return jnp.sum(adv * mask, axis=-1, keepdims=True) / jnp.maximum(
        jnp.sum(mask, axis=-1, keepdims=True), 1.0)


def is_row_metric(name: str, value: jax.Array, importance_sampling_level: str) -> bool:
    """Whether a surrogate metric holds one value per row (`[N, 1]`, averaged over rows,
    as TRL does for sequence-level weights) rather than per token."""
    return value.shape[-1] == 1 and (importance_sampling_level == "sequence"
                                     or name == "phi_seq")


def importance_weights(logp: jax.Array, old_logp: jax.Array, mask: jax.Array,
                       level: str = "token") -> tuple[jax.Array, jax.Array]:
    """`(log_ratio [N, T], log_weights)`: the clamped per-token `logp - old_logp`, and the
    log importance weights, `[N, T]` (`"token"`) or `[N, 1]` (`"sequence"`, GSPO: the
    mean log-ratio over each row's valid tokens)."""
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level={level!r}; expected one of "
                         f"{IMPORTANCE_SAMPLING_LEVELS}")
    m = jnp.asarray(mask).astype(jnp.float32)
    log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if level == "token":
        return log_ratio, log_ratio
    seq = jnp.sum(log_ratio * m, axis=-1, keepdims=True) / jnp.maximum(
        jnp.sum(m, axis=-1, keepdims=True), 1.0)
    return log_ratio, seq


def off_policy_sequence_mask(advantages: jax.Array, logp: jax.Array, old_logp: jax.Array,
                             mask: jax.Array, threshold: float) -> jax.Array:
    """DeepSeek-V3.2's off-policy sequence mask (TRL's `get_off_policy_mask`), `[N, 1]`:
    1 keeps a row, 0 drops it. A row is dropped when its advantage is negative and its
    mean `old_logp - logp` (the forward KL estimate of the sampler to the current policy)
    over valid tokens exceeds `threshold`."""
    m = jnp.asarray(mask).astype(jnp.float32)
    kl = jax.lax.stop_gradient(old_logp - logp)
    avg = jnp.sum(kl * m, axis=-1, keepdims=True) / jnp.maximum(
        jnp.sum(m, axis=-1, keepdims=True), 1.0)
    return ((_row_advantage(advantages, m) >= 0) | (avg <= threshold)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("threshold_quantile",))
def high_entropy_mask(entropies: jax.Array, mask: jax.Array,
                      threshold_quantile: float) -> jax.Array:
    """TRL's `get_high_entropy_mask`: 1 on valid tokens whose entropy is at least the
    `threshold_quantile` quantile (linear interpolation, as `torch.quantile`) of the
    entropies of every valid token passed in; `[N, T]` float, 0 on padding and
    everywhere when no token is valid. `top_entropy_quantile = rho` keeps the top-rho
    tokens: pass `threshold_quantile = 1 - rho`."""
    keep = jnp.asarray(mask) > 0
    h = jnp.asarray(entropies, jnp.float32)
    threshold = jnp.nanquantile(jnp.where(keep, h, jnp.nan), threshold_quantile)
    out = keep & (jnp.where(keep, h, 0.0) >= threshold) & jnp.any(keep)
    return jax.lax.stop_gradient(out.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=(
    "loss_type", "epsilon", "epsilon_high", "beta", "delta", "importance_sampling_level",
    "use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
    "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "off_policy_mask_threshold"))
def per_token_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array,
                   mask: jax.Array, *, loss_type: str = "dapo", epsilon: float = 0.2,
                   epsilon_high: float | None = None, beta: float = 0.0,
                   ref_logp: jax.Array | None = None, delta: float | None = None,
                   importance_sampling_level: str = "token",
                   use_bias_correction_kl: bool = True,
                   sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                   vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                   vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
                   off_policy_mask_threshold: float | None = None,
                   entropy_mask: jax.Array | None = None,
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The per-token loss of one GRPO loss type, as TRL 1.16's `_compute_loss` builds it.

    ```
    log_w  = clamp(logp - old_logp, +-LOG_RATIO_CLAMP)        "token"    [N, T]
           = masked mean over t of the same                   "sequence" [N, 1] (GSPO)
    rho    = exp(log_w)
    policy = SURROGATES[LOSS_SURROGATES[loss_type]](...)      clip / cispo / sapo / vespo
    policy = policy * off_policy_mask * entropy_mask          (each when given)
    kl     = exp(ref - logp) - (ref - logp) - 1               (k3)
    kl     = kl * rho                                         use_bias_correction_kl
    loss   = policy + beta * kl
    ```
    The clipped surrogate (`grpo`, `bnpo`, `dr_grpo`, `dapo`, `luspo`) is
    `-min(min(rho, delta) A, clip(rho, 1 - epsilon, 1 + epsilon_high) A)`. With the bias
    correction (DeepSeek-V3.2, TRL's default) the KL is weighted by the differentiable
    ratio, which makes its gradient the unbiased reverse-KL gradient when tokens come
    from `old_logp`; it changes the gradient even on-policy (rho = 1 in value). At
    sequence level the sequence weight multiplies every token's KL, as in TRL.
    `old_logp` and `ref_logp` are wrapped in `stop_gradient` here. With one policy update
    per generation batch (`num_iterations == 1`) pass `old_logp = logp`: the ratio is
    then exactly 1 in value and the gradient is that of `-A * logp`.

    Args:
        logp: float `[N, T]` log-probs of the sampled tokens under the current policy.
        old_logp: `[N, T]` log-probs under the policy that sampled them.
        advantages: `[N]` (broadcast over tokens) or `[N, T]` (from `token_advantages`).
        mask: `[N, T]`, 1 on tokens in the loss; the returned loss is 0 elsewhere (even if
            `logp` is not finite there).
        loss_type: a key of `LOSS_TYPES` (its surrogate; the aggregation is `aggregate`'s).
        epsilon: lower clip range, epsilon_low (0.2).
        epsilon_high: upper clip range; None means `epsilon` (DAPO Clip-Higher: 0.28;
            for `cispo` the absolute weight cap, recommended 5.0).
        beta: KL coefficient, a Python float (static); 0 adds no KL term (TRL's default).
        ref_logp: `[N, T]` reference-policy log-probs; required if `beta != 0`.
        delta: optional cap on the unclipped ratio (INTELLECT-2's two-sided clip; bounds
            the loss for negative advantages); should exceed `1 + epsilon_high`.
        importance_sampling_level: "token" or "sequence" (GSPO).
        use_bias_correction_kl: multiply the per-token KL by the ratio (TRL's default).
        sapo_temperature_pos, sapo_temperature_neg: SAPO gate temperatures for A > 0 and
            A <= 0 (TRL: 1.0, 1.05).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's Gamma
            weighting for A >= 0 and A < 0 (TRL: 2, 3, 3, 2).
        off_policy_mask_threshold: drop rows with A < 0 whose mean KL from `old_logp`
            exceeds this (DeepSeek-V3.2; None: off; see `off_policy_sequence_mask`).
        entropy_mask: optional `[N, T]` 0/1 multiplying the policy term (not the KL),
            from `high_entropy_mask` (`top_entropy_quantile`).

    Returns:
        `(loss, metrics)`: float32 `[N, T]` per-token loss, 0 where mask is 0, and the
        metrics of the surrogate: `[N, T]` token values (0 where mask is 0) or `[N, 1]`
        row values (sequence level; averaged over rows): `is_low_clipped`
        (`rho < 1 - epsilon` and `A < 0`), `is_high_clipped` (`rho > 1 + epsilon_high`
        and `A > 0`), `is_region_clipped` (either) for the clipped types;
        `cispo_clip_ratio`; `phi_seq` (VESPO's weight, `[N, 1]`); and `kl` (the
        corrected k3 estimate when `use_bias_correction_kl`, `[N, T]`) whenever
        `ref_logp` is given.

    Raises:
        ValueError: on an unknown loss type or level, if `beta != 0` without `ref_logp`,
            or on a bad clip range.
    """
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    if not (0.0 <= eps_low < 1.0) or eps_high < 0.0:
        raise ValueError(f"need 0 <= epsilon < 1 and epsilon_high >= 0, got epsilon={epsilon}, "
                         f"epsilon_high={epsilon_high}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (reference-policy log-probs); pass them "
                         "or set beta=0")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {sorted(LOSS_TYPES)}")
    keep = jnp.asarray(mask) > 0
    m = keep.astype(jnp.float32)
    # Zero the inputs at masked positions (padding may hold -inf log-probs) so that no
    # inf/NaN arises there, not even in the gradient of the discarded branch of `where`.
    logp = jnp.where(keep, jnp.asarray(logp, jnp.float32), 0.0)
    old = jax.lax.stop_gradient(jnp.where(keep, jnp.asarray(old_logp, jnp.float32), 0.0))
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.ndim == 1:
        adv = adv[:, None]

    log_ratio, log_w = importance_weights(logp, old, m, importance_sampling_level)
    coef_1 = jnp.exp(log_w)
    options = {"epsilon": eps_low, "epsilon_high": eps_high,
               "delta": None if delta is None else float(delta),
               "sapo_temperature_pos": float(sapo_temperature_pos),
               "sapo_temperature_neg": float(sapo_temperature_neg),
               "vespo_k_pos": float(vespo_k_pos), "vespo_lambda_pos": float(vespo_lambda_pos),
               "vespo_k_neg": float(vespo_k_neg), "vespo_lambda_neg": float(vespo_lambda_neg)}
    surrogate = SURROGATES[LOSS_SURROGATES.get(loss_type, "clip")]
    loss, sur = surrogate(SurrogateInputs(coef_1, logp, log_ratio, adv, m, options))
    loss = jnp.broadcast_to(loss, m.shape)
    if off_policy_mask_threshold is not None:
        loss = loss * off_policy_sequence_mask(adv, logp, old, m, float(off_policy_mask_threshold))
    if entropy_mask is not None:
        loss = loss * jnp.asarray(entropy_mask, jnp.float32)

    metrics = {k: v if is_row_metric(k, v, importance_sampling_level) else v * m
               for k, v in sur.items()}
    if ref_logp is not None:
        ref = jnp.where(keep, jnp.asarray(ref_logp, jnp.float32), 0.0)
        x = jax.lax.stop_gradient(ref) - logp
        kl = jnp.exp(x) - x - 1.0
        if use_bias_correction_kl:
            kl = kl * coef_1
        metrics["kl"] = jnp.where(keep, kl, 0.0)
        if beta != 0.0:
            loss = loss + beta * kl
    return jnp.where(keep, loss, 0.0), metrics


# ----------------------------------------------------------------------------- aggregation
#: `fn(masked_loss [N, T], mask [N, T], max_completion_length) -> (loss_sum, count)`.
LossAggregator = Callable[[jax.Array, jax.Array, "int | None"], tuple[jax.Array, jax.Array]]

#: Aggregations by name (`loss_type`); see `aggregate`. Add one with `register_loss_type`.
LOSS_TYPES: dict[str, LossAggregator] = {}


def register_loss_type(name: str, surrogate: str = "clip",
                       ) -> Callable[[LossAggregator], LossAggregator]:
    """Decorator registering `fn(masked_loss, mask, max_completion_length) -> (sum, count)`
    as loss type `name`, whose per-token policy term is `SURROGATES[surrogate]` (the
    clipped surrogate by default).

    `masked_loss` is already zero on masked positions. The pair must be such that summing
    it over gradient-accumulation micro-batches and dividing gives the intended loss.
    Register at import time, before `aggregate` first runs with that name (jit caches the
    traced function by `loss_type`).
    """
    if surrogate not in SURROGATES:
        raise ValueError(f"unknown surrogate {surrogate!r}; expected one of {sorted(SURROGATES)}")

    def register(fn: LossAggregator) -> LossAggregator:
        if name in LOSS_TYPES:
            raise ValueError(f"loss_type {name!r} is already registered")
        LOSS_TYPES[name] = fn
        LOSS_SURROGATES[name] = surrogate
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


@register_loss_type("cispo", surrogate="cispo")
def _cispo_agg(lm, m, max_completion_length):
    # CISPO (MiniMax-M1): token sum over the step's loss tokens, as dapo.
    return _dapo(lm, m, max_completion_length)


@register_loss_type("sapo", surrogate="sapo")
def _sapo_agg(lm, m, max_completion_length):
    # SAPO: per-sequence token means, then the mean over sequences, as grpo.
    return _grpo(lm, m, max_completion_length)


@register_loss_type("luspo")
def _luspo(lm, m, max_completion_length):
    # LUSPO: each sequence's loss scaled by its length (the token sum of a sequence-level
    # loss), then the mean over sequences.
    del m, max_completion_length
    return jnp.sum(lm), jnp.asarray(lm.shape[0], jnp.float32)


@register_loss_type("vespo", surrogate="vespo")
def _vespo_agg(lm, m, max_completion_length):
    # VESPO: token sum over the step's loss tokens, as dapo.
    return _dapo(lm, m, max_completion_length)


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
    - `cispo`, `vespo`: as `dapo`; `sapo`: as `grpo` (their surrogates differ).
    - `luspo`: `(sum l, n)` -> `sum l / N`: the mean over sequences of each sequence's
      token sum (a sequence-level loss times its length). TRL takes the mean per
      micro-batch over the accumulation steps: the same for equal micro-batches.

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


#: Logged names of the surrogate metrics (TRL's).
_METRIC_NAMES = {"is_low_clipped": "clip_ratio/low_mean", "is_high_clipped": "clip_ratio/high_mean",
                 "is_region_clipped": "clip_ratio/region_mean",
                 "cispo_clip_ratio": "cispo_clip_ratio", "phi_seq": "vespo/phi_seq_mean",
                 "kl": "kl"}


@functools.partial(jax.jit, static_argnames=(
    "loss_type", "max_completion_length", "epsilon", "epsilon_high", "beta", "delta",
    "importance_sampling_level", "use_bias_correction_kl", "sapo_temperature_pos",
    "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
    "vespo_lambda_neg", "off_policy_mask_threshold", "top_entropy_quantile"))
def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                *, loss_type: str = "dapo", max_completion_length: int | None = None,
                epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                ref_logp: jax.Array | None = None, delta: float | None = None,
                importance_sampling_level: str = "token", use_bias_correction_kl: bool = True,
                sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
                off_policy_mask_threshold: float | None = None,
                top_entropy_quantile: float = 1.0, entropies: jax.Array | None = None,
                entropy_coef: jax.Array | None = None,
                ) -> tuple[jax.Array, jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """`per_token_loss` + `aggregate` + metrics (+ the entropy terms), in the objective
    contract's shape.

    Returns `(loss_sum, count, aux)` ready to be returned by a `loss_fn` for
    `jaxpost.train.step`; `aux` maps TRL's metric names (`clip_ratio/low_mean`,
    `clip_ratio/high_mean`, `clip_ratio/region_mean` for the clipped types,
    `cispo_clip_ratio`, `vespo/phi_seq_mean`, and `kl` when `ref_logp` is given) to
    `(sum, weight)` pairs: token means over the whole optimizer step, or row means for
    sequence-level values, as TRL logs them (TRL's `clip_ratio/low_min` / `high_max` are
    not logged).

    `top_entropy_quantile = rho < 1` (Beyond 80/20) keeps the policy term only on the
    tokens whose entropy is in the top rho of this micro-batch's valid tokens
    (`high_entropy_mask`; needs `entropies [N, T]`, from the temperature-scaled logits).
    `entropy_coef` (a traced scalar, so that an adaptive controller recompiles nothing;
    None: no bonus) subtracts `entropy_coef * H`, `H` the mean entropy over the tokens
    the policy term acts on, differentiable through `entropies`. TRL subtracts `H` of
    each micro-batch divided by the accumulation steps; here `coef * H * count` joins
    `loss_sum`, which gives exactly that for the loss types whose `count` is the same in
    every micro-batch (`grpo`, `bnpo`, `dr_grpo`, `sapo`, `luspo`; equal micro-batches),
    and for the token-normalised ones (`dapo`, `cispo`, `vespo`) the mean of `H` weighted
    by each micro-batch's loss tokens (TRL's value when every micro-batch holds as many,
    or with one micro-batch). With a bonus, `aux` also has `policy_loss` (the loss
    without it) and `entropy_bonus/entropy` (the token mean of `H` over the step, which
    an adaptive controller reads).

    Other arguments as in `per_token_loss` and `aggregate`.
    """
    if top_entropy_quantile < 1.0 or entropy_coef is not None:
        if entropies is None:
            raise ValueError("top_entropy_quantile < 1 and the entropy bonus need entropies "
                             "[N, T] (token_entropy of the temperature-scaled logits)")
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
    m = (jnp.asarray(mask) > 0).astype(jnp.float32)
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropies, m, 1.0 - float(top_entropy_quantile))
    loss, tok = per_token_loss(
        logp, old_logp, advantages, m, loss_type=loss_type, epsilon=epsilon,
        epsilon_high=epsilon_high, beta=beta, ref_logp=ref_logp, delta=delta,
        importance_sampling_level=importance_sampling_level,
        use_bias_correction_kl=use_bias_correction_kl,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg, off_policy_mask_threshold=off_policy_mask_threshold,
        entropy_mask=entropy_mask)
    loss_sum, count = aggregate(loss, m, loss_type, max_completion_length)
    aux = {}
    for key, values in tok.items():
        if is_row_metric(key, values, importance_sampling_level):
            aux[_METRIC_NAMES.get(key, key)] = (jnp.sum(values), jnp.asarray(values.shape[0],
                                                                             jnp.float32))
        else:
            aux[_METRIC_NAMES.get(key, key)] = masked_mean_pair(values, m)
    if entropy_coef is not None:
        effective = m if entropy_mask is None else m * entropy_mask
        h = jnp.where(effective > 0, jnp.asarray(entropies, jnp.float32), 0.0)
        h_sum, h_count = jnp.sum(h * effective), jnp.sum(effective)
        bonus = jnp.asarray(entropy_coef, jnp.float32) * h_sum / jnp.maximum(h_count, 1.0)
        aux["policy_loss"] = (loss_sum, count)
        aux["entropy_bonus/entropy"] = (jax.lax.stop_gradient(h_sum), h_count)
        loss_sum = loss_sum - bonus * count
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
