"""Rollout rows and completion log-probabilities: the pure pieces a policy-gradient
trainer builds from sampled completions.

Row layout, width `P + C` (`P = prompt_len`, `C = completion_len`): the prompt
left-padded to `P` (a longer prompt keeps its last `P` tokens), then the completion
right-padded to `C`. Segment ids are 1 on real tokens and 0 on padding; positions count
real tokens from 0 at the first prompt token. Logits at columns `P-1 .. P+C-2` predict
the completion tokens (columns `P .. P+C-1`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models import KVCache, ModelConfig, Transformer, head_logits, token_logprobs
from jaxpost.models.layers import dropout_rngs


def build_rows(prompt_ids: list[list[int]], completions: np.ndarray, lengths: np.ndarray,
               p: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows [N, P + C]: left-padded prompt then right-padded completion, with segment ids,
    positions and the completion mask [N, C].

    Args:
        prompt_ids: N prompt id lists (longer than `p`: their last `p` ids are kept).
        completions: int [N, C] sampled ids (values past a row's length are ignored).
        lengths: int [N] completion lengths.
        p: prompt width P.
        pad_id: id written into padding.

    Returns:
        `tokens`, `positions`, `segment_ids` (int32 [N, P + C]) and `completion_mask`
        (float32 [N, C], 1 on the first `lengths[i]` completion tokens).
    """
    n, c = completions.shape
    tokens = np.full((n, p + c), pad_id, np.int32)
    seg = np.zeros((n, p + c), np.int32)
    for i, ids in enumerate(prompt_ids):
        ids = ids[-p:]
        tokens[i, p - len(ids):p] = ids
        seg[i, p - len(ids):p] = 1
    comp_mask = (np.arange(c)[None, :] < lengths[:, None])
    tokens[:, p:] = np.where(comp_mask, completions, pad_id)
    seg[:, p:] = comp_mask
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return {"tokens": tokens, "positions": positions, "segment_ids": seg,
            "completion_mask": comp_mask.astype(np.float32)}


def completion_logits(model_cfg: ModelConfig, params, rows, prompt_len: int,
                      completion_len: int, temperature: float,
                      rng: jax.Array | None = None, *, group_size: int = 1) -> jax.Array:
    """float32 logits [N, C, V] / `temperature` that predict the completion tokens of
    `rows` (`tokens`, `positions`, `segment_ids` laid out as by `build_rows`); `rng`
    drives LoRA dropout in training passes (None: deterministic). The head runs on the
    completion positions only.

    `group_size` G > 1 declares that rows `g*G .. g*G+G-1` share one prompt (GRPO's
    groups): the prompt is then run once per group, its keys and values shared by the
    group's completions through a KV cache, the same model and the same logits (up to
    float rounding) for `(P + C) / (P/G + C)` fewer layer FLOPs per row (1.6x at
    P = C, G = 4). Rows that do not share their prompt give wrong logits: the caller
    vouches for the grouping. Under LoRA dropout a group's prompt positions then share
    one dropout mask.
    """
    p, c = prompt_len, completion_len
    if group_size > 1:
        return _shared_prompt_logits(model_cfg, params, rows, p, c, rng,
                                     group_size) / temperature
    logits = Transformer(model_cfg).apply(
        {"params": params}, rows["tokens"], positions=rows["positions"],
        segment_ids=rows["segment_ids"], rngs=dropout_rngs(model_cfg, rng),
        output_slice=(p - 1, p + c - 1))
    return logits.astype(jnp.float32) / temperature


def _shared_prompt_logits(model_cfg: ModelConfig, params, rows, p: int, c: int,
                          rng: jax.Array | None, group_size: int) -> jax.Array:
    """`completion_logits` (before the temperature) with one prompt pass per group: the
    group's first row's prompt fills a KV cache, which the group's rows share as its
    prefix (`KVCache.share_rows`); the completions (but their last token, which predicts
    nothing) then attend to it. Both passes stop at the final hidden states, joined into
    one head matmul over the C completion positions."""
    n = rows["tokens"].shape[0]
    if n % group_size:
        raise ValueError(f"{n} rollout rows are not whole groups of group_size={group_size}")
    model = Transformer(model_cfg)
    variables = {"params": params}
    rng_prompt, rng_completion, rng_head = (
        (None, None, None) if rng is None else jax.random.split(rng, 3))
    head = {k: rows[k][::group_size, :p] for k in ("tokens", "positions", "segment_ids")}
    cache = KVCache.init(model_cfg, n // group_size, p)
    last, cache = model.apply(
        variables, head["tokens"], positions=head["positions"],
        segment_ids=head["segment_ids"], cache=cache, last_only=True, return_hidden=True,
        rngs=dropout_rngs(model_cfg, rng_prompt))
    # Left padding puts every prompt's last token at column p - 1: `last` predicts the
    # first completion token.
    cache = cache.share_rows(group_size, c)
    tail = {k: rows[k][:, p:p + c - 1] for k in ("tokens", "positions", "segment_ids")}
    rest, _ = model.apply(
        variables, tail["tokens"], positions=tail["positions"],
        segment_ids=tail["segment_ids"], cache=cache, return_hidden=True,
        rngs=dropout_rngs(model_cfg, rng_completion))
    hidden = jnp.concatenate([jnp.repeat(last, group_size, axis=0)[:, None], rest], axis=1)
    return head_logits(model_cfg, params, hidden, rngs=dropout_rngs(model_cfg, rng_head))


def completion_logprobs(model_cfg: ModelConfig, params, rows, prompt_len: int,
                        completion_len: int, temperature: float, *,
                        return_logits: bool = False, rng: jax.Array | None = None,
                        group_size: int = 1):
    """log p(completion token) [N, C] under `log_softmax(logits / temperature)`.

    The same quantity the sampler reports (before top-k / top-p truncation), recomputed
    with one forward pass over `rows` (`group_size`: see `completion_logits`). With
    `return_logits`, returns `(logp, logits)`, `logits` as `completion_logits` gives them
    (e.g. for the entropy).
    """
    logits = completion_logits(model_cfg, params, rows, prompt_len, completion_len,
                               temperature, rng, group_size=group_size)
    logp = token_logprobs(logits, rows["tokens"][:, prompt_len:])
    return (logp, logits) if return_logits else logp


__all__ = ["build_rows", "completion_logits", "completion_logprobs"]
