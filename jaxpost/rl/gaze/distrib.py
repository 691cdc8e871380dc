"""GazeDistrib: a sequence reward spread over its tokens in proportion to reading time.

Galliamov, Titov & Pershin, "Enhancing RLHF with Human Gaze Modeling" (arXiv 2507.09016;
ALGORITHMS.md 2.2): for a response with reward R and predicted total reading times
t_1..t_n, `r_i = R * exp(t_i) / sum_j exp(t_j)`, so the token rewards sum to R. Ours
(marked [U] in ALGORITHMS.md): a temperature, standardising t within each sequence (raw
milliseconds would make the softmax one-hot), and mixing with the terminal reward
`r_t = mix * R * w_t + (1 - mix) * R * 1[t = last]` (mix = 1 is the paper's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

#: Added to the within-sequence std when standardising reading times.
STANDARDIZE_EPS = 1e-6


def check_rows(mask, where: str = "mask") -> None:
    """Raises ValueError naming the first row of a concrete `[N, T]` mask with no valid
    token (such a row has no token to give its reward to). Traced masks are not checked."""
    if isinstance(mask, jax.core.Tracer):
        return
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"{where} must be [N, T], got shape {m.shape}")
    empty = np.flatnonzero(m.sum(axis=1) <= 0)
    if empty.size:
        raise ValueError(f"{where} row {int(empty[0])} has no valid token (rows with none: "
                         f"{empty[:8].tolist()}{'...' if empty.size > 8 else ''}); every "
                         "completion needs at least one token to receive its reward")


def standardize(values: jax.Array, mask: jax.Array) -> jax.Array:
    """`(t - mean) / (std + 1e-6)` over each row's valid tokens (population std); 0 on
    padding. A row of one valid token (std 0) becomes 0 there."""
    m = jnp.asarray(mask).astype(jnp.float32)
    t = jnp.where(m > 0, jnp.asarray(values, jnp.float32), 0.0)
    n = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
    mean = jnp.sum(t, axis=-1, keepdims=True) / n
    dev = jnp.where(m > 0, t - mean, 0.0)
    std = jnp.sqrt(jnp.sum(dev * dev, axis=-1, keepdims=True) / n)
    return dev / (std + STANDARDIZE_EPS)


@functools.partial(jax.jit, static_argnames=("standardize_times",))
def _gaze_weights(reading_times, mask, temperature, mix, standardize_times):
    m = jnp.asarray(mask).astype(jnp.float32)
    t = jnp.asarray(reading_times, jnp.float32)
    if standardize_times:
        t = standardize(t, m)
    logits = jnp.where(m > 0, t / temperature, -jnp.inf)
    # A row with no valid token would be all -inf (NaN softmax): give it zeros instead.
    any_valid = jnp.any(m > 0, axis=-1, keepdims=True)
    w = jax.nn.softmax(jnp.where(any_valid, logits, 0.0), axis=-1)
    w = jnp.where((m > 0) & any_valid, w, 0.0)
    # 1 on each row's last valid token (the terminal reward's position).
    pos = jnp.arange(m.shape[-1])
    last = jnp.max(jnp.where(m > 0, pos, -1), axis=-1, keepdims=True)
    terminal = (pos == last).astype(jnp.float32)
    return mix * w + (1.0 - mix) * terminal


def gaze_weights(reading_times, mask, temperature: float = 1.0, *, standardize_times: bool = False,
                 mix: float = 1.0) -> jax.Array:
    """The weights `w[N, T]` of `distribute_reward` (each valid row sums to 1; 0 on padding).

    Args:
        reading_times: float `[N, T]` per-token reading times (e.g. TRT remapped onto the
            policy's tokens by `jaxpost.rl.gaze.token_features`).
        mask: `[N, T]`, 1 on the completion tokens that take part.
        temperature: softmax temperature (> 0); 1 is the paper's.
        standardize_times: standardise t over each row's valid tokens first.
        mix: fraction of the weight spread by gaze, in [0, 1]; the rest goes to each
            row's last valid token (1: the paper's GazeDistrib; 0: terminal reward only).

    Raises:
        ValueError: on a bad temperature, mix or shapes, or (concrete masks) a row with
            no valid token, naming the row.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1] (1: all reward spread by gaze), got {mix}")
    if np.shape(reading_times) != np.shape(mask):
        raise ValueError(f"reading_times {np.shape(reading_times)} and mask {np.shape(mask)} "
                         "must have the same [N, T] shape")
    check_rows(mask)
    return _gaze_weights(reading_times, mask, jnp.float32(temperature), jnp.float32(mix),
                         bool(standardize_times))


def distribute_reward(rewards, reading_times, mask, temperature: float = 1.0, *,
                      standardize_times: bool = False, mix: float = 1.0) -> jax.Array:
    """GazeDistrib token rewards `r[i, t] = R_i * softmax_valid(t_i / temperature)[t]`.

    The public contract (ARCHITECTURE.md): `rewards [N]`, `reading_times [N, T]`,
    `mask [N, T]` -> float32 `[N, T]`; each row sums to `R_i`; padding gets 0; R = 0 gives
    zeros; a negative R is spread with the same weights. Options ([U], ours):
    `standardize_times` and the terminal `mix` (see `gaze_weights`). Jittable (under jit
    the no-valid-token check cannot run and such a row gets zeros).

    Example (ALGORITHMS.md 2.2): R = 2, t = (1, 0, 2) -> (0.489, 0.180, 1.330).

    Raises:
        ValueError: if `rewards` is not `[N]` matching the mask, and as `gaze_weights`.
    """
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1 or r.shape[0] != np.shape(mask)[0]:
        raise ValueError(f"rewards must be [N] with N = mask rows ({np.shape(mask)[0]}), got "
                         f"shape {r.shape}")
    w = gaze_weights(reading_times, mask, temperature, standardize_times=standardize_times,
                     mix=mix)
    return r[:, None] * w


__all__ = ["check_rows", "distribute_reward", "gaze_weights", "standardize"]
