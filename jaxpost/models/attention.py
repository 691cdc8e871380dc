"""Grouped-query attention with RoPE, causal/padding/segment masks and a KV cache.

Masks are built from `segment_ids` (0 = padding; equal non-zero ids attend to each other),
so packed sequences never attend across examples; without a cache the mask is causal and
the queries run in blocks that skip the keys after their end (`causal_query_blocks`).
The KV cache is an explicit pytree that goes in and comes out of `Transformer.__call__`,
which keeps `apply` pure and lets the sampler donate it. It comes in the two layer layouts
of `Transformer.layer_params`: one stacked buffer for all layers, or one buffer per layer.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxpost.models.config import ModelConfig
from jaxpost.models.layers import Linear, RMSNorm, constrain, dtype_of

#: Added to masked attention scores: finite, so a query with no visible key (padding)
#: gives a uniform distribution instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


#: The two layouts of the layer parameters and of the KV cache (`Transformer.layer_params`):
#: "stacked": one array per parameter (and one k / v buffer) with a leading `layers` axis;
#: "per_layer": one subtree (and one k / v buffer) per layer.
LAYER_LAYOUTS = ("stacked", "per_layer")


def check_layer_layout(layout: str, where: str) -> None:
    """Raises a ValueError naming `where` unless `layout` is one of `LAYER_LAYOUTS`."""
    if layout not in LAYER_LAYOUTS:
        raise ValueError(f"{where}: layer_params={layout!r}; must be one of {LAYER_LAYOUTS}")


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `max_len` slots.

    All rows write the same slot range at each call (prompts are left-padded by the
    sampler), so the write position is one scalar and the update one dynamic slice.
    In the "stacked" layout `k` and `v` are single arrays [layers, batch, kv_heads,
    max_len, head_dim]; in the "per_layer" layout (`Transformer(cfg,
    layer_params="per_layer")`) they are tuples of one [batch, kv_heads, max_len, head_dim]
    buffer per layer, so that each layer reads and writes its own buffer in place. Heads
    come before slots so that attention reads a cached head's keys contiguously: with
    slots first, XLA:CPU transposes every layer's whole cache at every decode step.

    A cache with a shared prefix (`share_rows`: one prompt's cache continued by n rows,
    GRPO's groups and the sampler's `num_samples`) keeps the prompt's keys and values once
    per group in `prefix_k` / `prefix_v` ([..., batch / n, kv_heads, P, head_dim], the
    layout of `k`), and only the rows' own slots in `k` / `v` ([..., batch, kv_heads,
    max_len - P, head_dim]); slot numbers (`index`, `key_mask`) count the
    prefix slots first. Attention reads each group's prefix once instead of n copies.
    """

    # stacked: [layers, batch, kv_heads, slots, head_dim]; per_layer: a tuple of
    # [batch, kv_heads, slots, head_dim], one per layer (slots: the rows' own slots).
    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]  # same layout as k
    key_mask: jax.Array  # [batch, max_len] bool: slot holds a real (non-padding) token
    index: jax.Array  # int32 scalar: the next slot to write
    # The shared prefix (see the class docstring), None without one.
    prefix_k: jax.Array | tuple[jax.Array, ...] | None = None
    prefix_v: jax.Array | tuple[jax.Array, ...] | None = None

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None, *,
             layer_params: str = "stacked") -> "KVCache":
        """An empty cache; `dtype` defaults to the model's compute dtype.

        `layer_params` must match the `Transformer`'s (see `LAYER_LAYOUTS`).
        """
        check_layer_layout(layer_params, "KVCache.init")
        dt = dtype_of(dtype or cfg.dtype)
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        if layer_params == "stacked":
            k = jnp.zeros((cfg.num_layers,) + shape, dt)
            v = jnp.zeros((cfg.num_layers,) + shape, dt)
        else:
            k = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))
            v = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))
        return cls(k=k, v=v, key_mask=jnp.zeros((batch, max_len), bool),
                   index=jnp.zeros((), jnp.int32))

    @property
    def layer_params(self) -> str:
        """The layout of `k` and `v`: "stacked" or "per_layer"."""
        return "per_layer" if isinstance(self.k, (tuple, list)) else "stacked"

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]

    def share_rows(self, n: int, new_slots: int) -> "KVCache":
        """This cache, filled up to its last slot, as the shared prefix of n rows per row
        (row i -> rows i*n .. i*n+n-1), each with `new_slots` empty slots of its own: one
        prompt's cache continued by its n completions, without n copies of the prompt."""
        if self.prefix_k is not None:
            raise ValueError("KVCache.share_rows: this cache already has a shared prefix")
        stacked = self.layer_params == "stacked"
        batch = self.key_mask.shape[0] * n

        def own(x):
            shape = x.shape[:-4] + (batch, x.shape[-3], new_slots, x.shape[-1])
            return jnp.zeros(shape, x.dtype)
        k = own(self.k) if stacked else tuple(own(x) for x in self.k)
        v = own(self.v) if stacked else tuple(own(x) for x in self.v)
        key_mask = jnp.concatenate([jnp.repeat(self.key_mask, n, axis=0),
                                    jnp.zeros((batch, new_slots), bool)], axis=1)
        return KVCache(k=k, v=v, key_mask=key_mask, index=self.index, prefix_k=self.k,
                       prefix_v=self.v)

    @staticmethod
    def logical_axes(layer_params: str = "stacked", num_layers: int | None = None, *,
                     shared_prefix: bool = False) -> "KVCache":
        """Logical axis names of each field, for `jaxpost.sharding`.

        The "per_layer" layout needs `num_layers` (one entry per buffer);
        `shared_prefix`: the axes of a cache made by `share_rows`.
        """
        check_layer_layout(layer_params, "KVCache.logical_axes")
        kv = ("cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim")
        if layer_params == "stacked":
            k = v = ("layers",) + kv
        elif num_layers is None:
            raise ValueError("KVCache.logical_axes(layer_params='per_layer') needs num_layers")
        else:
            k = v = (kv,) * num_layers
        prefix = k if shared_prefix else None
        return KVCache(k=k, v=v, key_mask=("cache_batch", "cache_length"), index=(),
                       prefix_k=prefix, prefix_v=prefix)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, T, head_dim] for integer `positions` [B, T] (float32)."""
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, heads, head_dim] by half-split RoPE (HF `rotate_half` layout)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def make_attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T, T] bool: causal, same segment, key not padding (segment id 0)."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same & (segment_ids[:, None, :] != 0)


def make_cache_mask(key_mask: jax.Array, index: jax.Array, num_queries: int) -> jax.Array:
    """[B, T, S] bool for queries written at slots index..index+T-1 of a cache."""
    q_slot = index + jnp.arange(num_queries)
    k_slot = jnp.arange(key_mask.shape[1])
    return (k_slot[None, :] <= q_slot[:, None])[None] & key_mask[:, None, :]


#: Query block length of the cache-free causal path (see `causal_query_blocks`).
CAUSAL_BLOCK = 64
#: At most this many query blocks: the unrolled blocks grow the program, and the share of
#: skipped (masked) scores, (n - 1) / 2n, gains little past it.
MAX_CAUSAL_BLOCKS = 8


def causal_query_blocks(length: int) -> int:
    """Into how many equal query blocks the cache-free causal attention splits `length`.

    Block i attends only to the keys up to its own end, which skips the scores above the
    causal diagonal (a quarter of them at 2 blocks, 3/8 at 4): less matmul and softmax
    work for the same result on every query with a visible key. A query with no visible
    key at all (padding) gets a uniform distribution over its block's keys instead of
    over all keys; nothing reads it, since padding keys are masked for every query.
    Blocks of `CAUSAL_BLOCK` positions, or `MAX_CAUSAL_BLOCKS` equal longer ones for
    longer inputs; 1 (no split) unless `length` is a multiple of `CAUSAL_BLOCK`.
    """
    if length % CAUSAL_BLOCK:
        return 1
    # A multiple of CAUSAL_BLOCK is a multiple of MAX_CAUSAL_BLOCKS: the blocks are equal.
    return min(length // CAUSAL_BLOCK, MAX_CAUSAL_BLOCKS)


def attend(qg: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
           causal_blocks: int = 1, prefix: tuple[jax.Array, jax.Array] | None = None
           ) -> jax.Array:
    """Softmax attention of grouped queries qg [B, T, KV, G, hd] over head-major keys and
    values [B, KV, S, hd] under mask [B, T, S] (True: visible); returns [B, T, KV, G, hd].

    Scores are float32 whatever the inputs' dtype; the output has qg's dtype. With
    `causal_blocks` = n > 1 (T = S, a causal `mask`, n dividing T) the queries run in n
    blocks, block i over the keys before its end only (see `causal_query_blocks`).
    `prefix` = (keys, values) [B / n, KV, P, hd]: n rows per group also attend to their
    group's shared prefix, which comes before `k` (`KVCache.share_rows`); `mask` is then
    [B, T, P + S], the prefix slots first.
    """
    if prefix is not None:
        return _attend_prefixed(qg, prefix[0], prefix[1], k, v, mask)
    if causal_blocks == 1:
        return _attend(qg, k, v, mask)
    t = qg.shape[1]
    if t != k.shape[2] or t % causal_blocks:
        raise ValueError(f"attend: causal_blocks={causal_blocks} needs as many keys as "
                         f"queries and a block count that divides them; got {t} queries, "
                         f"{k.shape[2]} keys")
    size = t // causal_blocks
    return jnp.concatenate([
        _attend(qg[:, i * size:(i + 1) * size], k[:, :, :(i + 1) * size],
                v[:, :, :(i + 1) * size], mask[:, i * size:(i + 1) * size, :(i + 1) * size])
        for i in range(causal_blocks)], axis=1)


def _attend(qg, k, v, mask):
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k,
                        preferred_element_type=jnp.float32) * (qg.shape[-1] ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(qg.dtype)
    # A plain batched matmul over (b, k), then the result to [b, t, k, g, d]: asked for in
    # that order directly, XLA:CPU contracted the slot axis as a transposed operand (17%
    # of a decode step).
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)
    return jnp.transpose(out, (0, 3, 1, 2, 4))


def _attend_prefixed(qg, pk, pv, k, v, mask):
    """`_attend` over a group-shared prefix (pk, pv) [R, KV, P, hd] and the rows' own keys
    (k, v) [B, KV, S, hd], B = R * n: one softmax over the P + S scores of each query.
    A group's n rows and G query heads meet its prefix in one matmul per (group, kv head)."""
    b, t, kvh, gh, d = qg.shape
    r, p = pk.shape[0], pk.shape[2]
    if b % r:
        raise ValueError(f"attend: {b} query rows are not whole groups of the prefix's {r}")
    n = b // r
    qp = qg.reshape(r, n, t, kvh, gh, d)
    s_pre = jnp.einsum("rntkgd,rksd->rkgnts", qp, pk, preferred_element_type=jnp.float32)
    s_pre = jnp.transpose(s_pre, (0, 3, 1, 2, 4, 5)).reshape(b, kvh, gh, t, p)
    s_own = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.concatenate([s_pre, s_own], axis=-1) * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(qg.dtype)
    p_pre = jnp.transpose(probs[..., :p].reshape(r, n, kvh, gh, t, p), (0, 2, 3, 1, 4, 5))
    o_pre = jnp.einsum("rkgnts,rksd->rkgntd", p_pre, pv)
    o_pre = jnp.transpose(o_pre, (0, 3, 4, 1, 2, 5)).reshape(b, t, kvh, gh, d)
    o_own = jnp.einsum("bkgts,bksd->bkgtd", probs[..., p:], v)
    return o_pre + jnp.transpose(o_own, (0, 3, 1, 2, 4))


class Attention(nn.Module):
    """GQA self-attention; with `layer_cache`, attends over the cache after writing to it.

    `layer_cache` is `(k, v, layer, prefix_k, prefix_v)`, in one of two forms:
      - stacked: the caches of ALL layers [L, B, KV, S, hd] and this layer's int32 index,
        so the layer scan carries them and every write is in place (a per-layer slice as a
        scan input/output would copy the whole cache at every decode step);
      - per layer: this layer's own buffers [B, KV, S, hd] and `layer=None`.
    `prefix_k` / `prefix_v`: a shared prefix in the same form (`KVCache.share_rows`), or
    None. The returned cache has the same form (the layer index advanced by one).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache=None, index=None):
        cfg = self.cfg
        b, t, _ = x.shape
        h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        q = Linear(h * hd, ("embed", "heads"), cfg, use_bias=bias, name="q_proj")(x)
        k = Linear(kv * hd, ("embed", "kv_heads"), cfg, use_bias=bias, name="k_proj")(x)
        v = Linear(kv * hd, ("embed", "kv_heads"), cfg, use_bias=bias, name="v_proj")(x)
        q = q.reshape(b, t, h, hd)
        k = k.reshape(b, t, kv, hd)
        v = v.reshape(b, t, kv, hd)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, cfg, axis_name="head_dim", name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg, axis_name="head_dim", name="k_norm")(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))

        dtype = dtype_of(cfg.dtype)
        groups = h // kv
        qg = q.reshape(b, t, kv, groups, hd)
        # Keys/values head-major [B, KV, S, hd] (as the cache holds them), so both
        # attention products are plain batched matmuls over (batch, kv head).
        k = jnp.swapaxes(k, 1, 2)
        v = jnp.swapaxes(v, 1, 2)
        new_cache, prefix = None, None
        if layer_cache is not None:
            ck, cv, layer, pk, pv = layer_cache
            # Slots count the shared prefix first; the rows' own buffers start after it.
            own = index if pk is None else index - pk.shape[-2]
            if layer is None:
                # This layer's own buffers [B, KV, S, hd]: write in place, read them whole.
                start = (0, 0, own, 0)
                ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start)
                cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start)
                new_cache = (ck, cv, None, pk, pv)
                k, v = ck, cv
                if pk is not None:
                    prefix = (pk.astype(dtype), pv.astype(dtype))
            else:
                # The stacked caches of all layers [L, B, KV, S, hd] and this layer's index:
                # write the new keys/values in place, then read this layer's slots.
                start = (layer, 0, 0, own, 0)
                ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), start)
                cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), start)
                new_cache = (ck, cv, layer + 1, pk, pv)
                k = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False)
                v = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False)
                if pk is not None:
                    prefix = tuple(jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
                                   .astype(dtype) for x in (pk, pv))
        # Without a cache the mask is causal (`make_attention_mask`), so the queries can
        # be split into blocks that skip the keys after their end.
        blocks = 1 if layer_cache is not None else causal_query_blocks(t)
        out = attend(qg, k.astype(dtype), v.astype(dtype), mask, causal_blocks=blocks,
                     prefix=prefix)
        out = out.reshape(b, t, h * hd)
        out = Linear(cfg.hidden_size, ("heads", "embed"), cfg, name="o_proj")(out)
        return out, new_cache
