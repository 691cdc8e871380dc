"""The SFT objective: next-token cross-entropy on the tokens the loss mask marks.

Batch convention (shared with `jaxpost.data`): `tokens`, `positions`, `segment_ids`,
`loss_mask`, all [B, T]; `loss_mask[b, t] = 1` when `tokens[b, t]` is a target predicted
from position t-1 of the same segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.models import ModelConfig, Transformer


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position in float32: logits [B, T, V], targets [B, T] -> [B, T]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - lse


def make_sft_loss(cfg: ModelConfig):
    """`loss_fn(params, batch, rng) -> (nll_sum, target_count, aux)` for `train_step`."""
    model = Transformer(cfg)

    def loss_fn(params, batch, rng):
        del rng  # no dropout in these models
        logits = model.apply({"params": params}, batch["tokens"], positions=batch.get("positions"),
                             segment_ids=batch.get("segment_ids"))
        logp = token_logprobs(logits[:, :-1], batch["tokens"][:, 1:])
        mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
        correct = (jnp.argmax(logits[:, :-1], axis=-1) == batch["tokens"][:, 1:]).astype(jnp.float32)
        count = jnp.sum(mask)
        aux = {"token_accuracy": (jnp.sum(correct * mask), count)}
        return -jnp.sum(logp * mask), count, aux

    return loss_fn
