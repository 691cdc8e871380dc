"""The decoder-only transformer (Llama / Qwen2 / Qwen3) as a pure Flax Linen module.

Layer parameters are always stacked along a leading `layers` axis (one pytree layout
whatever `scan_layers` says): `scan_layers=True` runs them with `lax.scan`, False unrolls
the same scan. Checkpoints, freeze rules and LoRA therefore see one layout, and a layer is
picked by index on that axis.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpost.models.attention import (
    Attention, KVCache, make_attention_mask, make_cache_mask, rope_tables)
from jaxpost.models.config import ModelConfig
from jaxpost.models.layers import MLP, Linear, RMSNorm, constrain, dtype_of

_ACT = ("activation_batch", "activation_length", "activation_embed")

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, cos, sin, mask, index):
        # carry: (x, cache) with cache None or (k, v, layer) of all layers (see Attention).
        x, cache = carry
        cfg = self.cfg
        h = RMSNorm(cfg.rms_norm_eps, cfg, name="input_layernorm")(x)
        h, cache = Attention(cfg, name="self_attn")(h, cos, sin, mask, cache, index)
        x = constrain(x + h, _ACT)
        h = RMSNorm(cfg.rms_norm_eps, cfg, name="post_attention_layernorm")(x)
        x = constrain(x + MLP(cfg, name="mlp")(h), _ACT)
        return (x, cache), None


class Transformer(nn.Module):
    """Token ids [B, T] -> logits [B, T, vocab] (float32).

    Args of `__call__`:
      tokens: int32 [B, T].
      positions: int32 [B, T] RoPE positions. Default: 0..T-1 without a cache; with a
        cache, each row continues from the number of real tokens it already holds.
      segment_ids: int32 [B, T]; 0 marks padding, equal non-zero ids form one sequence
        (packing). Default: all ones.
      cache: a `KVCache`; the call writes the new keys/values at `cache.index` and
        returns `(logits, new_cache)`.
      return_hidden: return the final normed hidden states [B, T, hidden] instead of
        logits (reward and value heads).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
                 *, return_hidden: bool = False):
        cfg = self.cfg
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        valid = segment_ids != 0
        if cache is None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            mask = make_attention_mask(segment_ids)
            index = None
            key_mask = None
        else:
            if positions is None:
                seen = jnp.sum(cache.key_mask, axis=1, dtype=jnp.int32)[:, None]
                positions = jnp.maximum(seen + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
            index = cache.index
            key_mask = jax.lax.dynamic_update_slice(cache.key_mask, valid, (0, index))
            mask = make_cache_mask(key_mask, index, t)
        cos, sin = rope_tables(cfg, positions)

        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
            dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype),
            name="embed_tokens")
        x = constrain(embed(tokens), _ACT)

        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat_policy],
                                 prevent_cse=not cfg.scan_layers)
        layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},  # dropout: LoRA adapters
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            unroll=1 if cfg.scan_layers else cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        # The KV cache rides in the scan carry, so decode steps update it in place.
        layer_caches = None if cache is None else (cache.k, cache.v, jnp.zeros((), jnp.int32))
        (x, new_caches), _ = layers((x, layer_caches), cos, sin, mask, index)

        x = RMSNorm(cfg.rms_norm_eps, cfg, name="norm")(x)
        if return_hidden:
            out = x
        elif cfg.tie_embeddings:
            out = embed.attend(x).astype(jnp.float32)
        else:
            out = Linear(cfg.vocab_size, ("embed", "vocab"), cfg, name="lm_head")(x).astype(jnp.float32)
        if not return_hidden:
            out = constrain(out, ("activation_batch", "activation_length", "activation_vocab"))
        if cache is None:
            return out
        new_cache = KVCache(k=new_caches[0], v=new_caches[1], key_mask=key_mask, index=index + t)
        return out, new_cache


@functools.lru_cache(maxsize=32)
def _jitted_init(cfg: ModelConfig):
    return jax.jit(lambda rng: nn.unbox(
        Transformer(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]))


def init_params(cfg: ModelConfig, rng: jax.Array, *, with_axes: bool = False):
    """Random parameters (plain pytree); with_axes also returns their logical axis names.

    Initialisation runs as one jitted program (compiled once per config): op-by-op
    Flax init is several times slower on CPU.
    """
    params = _jitted_init(cfg)(rng)
    if with_axes:
        return params, param_logical_axes(cfg)
    return params


def param_logical_axes(cfg: ModelConfig):
    """The logical axis names of every parameter, as a pytree of tuples (no FLOPs spent)."""
    boxed = jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    return nn.get_partition_spec(boxed)


def param_shapes(cfg: ModelConfig):
    """`jax.ShapeDtypeStruct` of every parameter."""
    return nn.unbox(jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
