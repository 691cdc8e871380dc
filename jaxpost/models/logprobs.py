"""Log-probabilities from logits: the one helper the SFT and GRPO objectives and the
analysis tools share (per-token of a target, full-vocabulary, and the exact token KL)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def vocab_logprobs(logits: jax.Array) -> jax.Array:
    """log p(v) over the whole vocabulary in float32: logits [..., V] -> [..., V]."""
    logits = logits.astype(jnp.float32)
    return logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def token_logprobs(logits: jax.Array, targets: jax.Array, *, with_hits: bool = False):
    """log p(target) per position in float32: logits [B, T, V], targets [B, T] -> [B, T].

    With `with_hits`, returns `(logp, hits)`: `hits` is 1.0 where the target's logit is
    the row's maximum (the argmax prediction is right; a tie counts as a hit), from the
    same max the log-sum-exp subtracts, so token accuracy costs no extra pass over the
    vocabulary.
    """
    logits = logits.astype(jnp.float32)
    peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    lse = peak + jnp.log(jnp.sum(jnp.exp(logits - peak[..., None]), axis=-1))
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = picked - lse
    if with_hits:
        return logp, (picked >= peak).astype(jnp.float32)
    return logp


def token_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """Exact KL(p || q) per position over the full vocabulary, in float32.

    `KL_t = sum_v p(v) (log p(v) - log q(v))` with p = softmax(logits_p), q =
    softmax(logits_q): logits [..., V] -> [...]. Not an estimator from sampled tokens
    (GRPO's k3): every vocabulary entry counts, so it is >= 0 up to rounding.
    """
    logp, logq = vocab_logprobs(logits_p), vocab_logprobs(logits_q)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


__all__ = ["token_kl", "token_logprobs", "vocab_logprobs"]
