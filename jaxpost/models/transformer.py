"""The decoder-only transformer (Llama / Qwen2 / Qwen3) as a pure Flax Linen module.

Layer parameters are stacked along a leading `layers` axis (one pytree layout whatever
`scan_layers` says): `scan_layers=True` runs them with `lax.scan`, False unrolls the same
scan, None (the default) unrolls on CPU and scans elsewhere: inside a scan XLA:CPU copies
every layer's weights, activations and gradients in and out of the stacked buffers at each
step (unrolled, a tiny-llama SFT step is ~5% faster there), while on accelerators the scan
keeps compile times flat in depth. Checkpoints, freeze rules and LoRA therefore see one
layout, and a layer is picked by index on that axis.

`Transformer(cfg, layer_params="per_layer")` is the same model over a second layout, for
inference: each layer's parameters are their own subtree `layers_0 .. layers_{L-1}` (made
from the stacked tree by `unstack_layer_params`) and the KV cache holds one buffer per
layer; the same `DecoderLayer` runs in a Python loop. XLA:CPU copies every layer's weights
out of the stack at every step of a decode loop when the layers are scanned (about 20% of
a tiny-llama decode step); per-layer arrays are read in place. The sampler uses this
layout on CPU.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpost.models.attention import (
    Attention, KVCache, check_layer_layout, make_attention_mask, make_cache_mask, rope_tables)
from jaxpost.models.config import ModelConfig
from jaxpost.models.layers import MLP, Linear, RMSNorm, constrain, dtype_of
from jaxpost.platform import platform

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
        # carry: (x, cache) with cache None or (k, v, layer, prefix_k, prefix_v) (see
        # Attention).
        x, cache = carry
        cfg = self.cfg
        h = RMSNorm(cfg.rms_norm_eps, cfg, name="input_layernorm")(x)
        h, cache = Attention(cfg, name="self_attn")(h, cos, sin, mask, cache, index)
        x = constrain(x + h, _ACT)
        h = RMSNorm(cfg.rms_norm_eps, cfg, name="post_attention_layernorm")(x)
        x = constrain(x + MLP(cfg, name="mlp")(h), _ACT)
        return (x, cache), None


def token_embedding(cfg: ModelConfig, num_embeddings: int | None = None,
                    name: str | None = None) -> nn.Embed:
    """The token-embedding module of `Transformer` (`embed_tokens`), defined once.

    `num_embeddings` (default `cfg.vocab_size`) lets a caller look ids up in a table
    grown by extra rows (a reward model's `<eye/>`/`</eye>` separators) with the same
    lookup and casts.
    """
    return nn.Embed(
        cfg.vocab_size if num_embeddings is None else num_embeddings, cfg.hidden_size,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
        dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), name=name)


def embed_tokens(cfg: ModelConfig, embedding: jax.Array, tokens: jax.Array) -> jax.Array:
    """`Transformer`'s input embeddings of `tokens` [B, T] from the table `embedding`
    [N, hidden] (`params["embed_tokens"]["embedding"]`, or that table with rows
    appended): [B, T, hidden] in `cfg.dtype`, for `Transformer(..., inputs_embeds=)`."""
    module = token_embedding(cfg, embedding.shape[0])
    return module.apply({"params": {"embedding": embedding}}, tokens)


def layer_name(i: int) -> str:
    """The params key of layer `i` in the "per_layer" layout."""
    return f"layers_{i}"


class Transformer(nn.Module):
    """Token ids [B, T] -> logits [B, T, vocab] (float32).

    Attributes:
      cfg: the model's config.
      layer_params: the parameter (and KV cache) layout, one of `attention.LAYER_LAYOUTS`.
        "stacked" (the default, what checkpoints and training use): `params["layers"]`
        holds every layer parameter with a leading layers axis, run by `nn.scan`.
        "per_layer" (inference on CPU): `params["layers_0"] .. params["layers_{L-1}"]`,
        one subtree per layer as `unstack_layer_params` makes them, run by a Python loop
        over the same `DecoderLayer`; a cache must then come from
        `KVCache.init(..., layer_params="per_layer")`. Both give the same logits.

    Args of `__call__`:
      tokens: int32 [B, T].
      positions: int32 [B, T] RoPE positions. Default: 0..T-1 without a cache; with a
        cache, each row continues from the number of real tokens it already holds.
      segment_ids: int32 [B, T]; 0 marks padding, equal non-zero ids form one sequence
        (packing). Default: all ones.
      cache: a `KVCache` in this module's layout; the call writes the new keys/values at
        `cache.index` and returns `(logits, new_cache)`.
      return_hidden: return the final normed hidden states [B, T, hidden] instead of
        logits (reward and value heads).
      with_hidden: return `(logits, hidden)`, both from this one pass (a policy with a
        value head on its trunk: PPO). With a cache: `((logits, hidden), new_cache)`.
      last_only: compute the output at the last position only: logits [B, vocab] (or
        hidden [B, hidden]). A prefill needs just the next-token logits, and the
        full-vocabulary head over every prompt position is the most expensive matmul of
        the call. With left-padded rows (as the sampler writes them) the last position is
        every row's last real token.
      output_slice: `(start, stop)`, static: compute the output at positions
        `start .. stop-1` only ([B, stop - start, vocab] logits, or hidden). A GRPO
        update needs the logits of the completion positions alone; the head over the
        prompt positions would be wasted work (the most expensive matmul per position).
      inputs_embeds: [B, T, hidden] input embeddings to run the layers on instead of
        `embed_tokens(tokens)` (Hugging Face's `inputs_embeds`), for inputs that are not
        (only) vocabulary rows: a reward model's gaze vectors added to or placed among
        the token embeddings (`jaxpost.rl.gaze_reward`). `tokens` still gives the shape;
        cast to `cfg.dtype`. None (the default) embeds `tokens`; passing
        `embed_tokens(cfg, params["embed_tokens"]["embedding"], tokens)` is the same call.
    """

    cfg: ModelConfig
    layer_params: str = "stacked"  # "stacked" | "per_layer"; see the class docstring

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
                 *, return_hidden: bool = False, with_hidden: bool = False,
                 last_only: bool = False, inputs_embeds: jax.Array | None = None,
                 output_slice: tuple[int, int] | None = None):
        cfg = self.cfg
        check_layer_layout(self.layer_params, "Transformer")
        if return_hidden and with_hidden:
            raise ValueError("Transformer: pass return_hidden (hidden only) or with_hidden "
                             "((logits, hidden)), not both")
        if cache is not None and cache.layer_params != self.layer_params:
            raise ValueError(
                f"Transformer(layer_params={self.layer_params!r}) got a KVCache in the "
                f"{cache.layer_params!r} layout; make it with KVCache.init(..., "
                f"layer_params={self.layer_params!r})")
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

        embed = token_embedding(cfg, name="embed_tokens")
        if inputs_embeds is None:
            x = embed(tokens)
        else:
            if inputs_embeds.shape != (b, t, cfg.hidden_size):
                raise ValueError(f"inputs_embeds has shape {inputs_embeds.shape}; expected "
                                 f"(batch, length, hidden_size) = {(b, t, cfg.hidden_size)}")
            x = inputs_embeds.astype(dtype_of(cfg.dtype))
        x = constrain(x, _ACT)

        per_layer = self.layer_params == "per_layer"
        scan = cfg.scans_layers()
        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat_policy],
                                 prevent_cse=per_layer or not scan)
        if per_layer:
            new_k, new_v = [], []
            for i in range(cfg.num_layers):
                layer_cache = None if cache is None else (
                    cache.k[i], cache.v[i], None,
                    *((None, None) if cache.prefix_k is None else
                      (cache.prefix_k[i], cache.prefix_v[i])))
                (x, layer_cache), _ = layer_cls(cfg, name=layer_name(i))(
                    (x, layer_cache), cos, sin, mask, index)
                if cache is not None:
                    new_k.append(layer_cache[0])
                    new_v.append(layer_cache[1])
            new_k, new_v = tuple(new_k), tuple(new_v)
        else:
            layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},  # dropout: LoRA adapters
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                unroll=1 if scan else cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
            # The KV cache rides in the scan carry, so decode steps update it in place.
            layer_caches = None if cache is None else (
                cache.k, cache.v, jnp.zeros((), jnp.int32), cache.prefix_k, cache.prefix_v)
            (x, layer_caches), _ = layers((x, layer_caches), cos, sin, mask, index)
            if cache is not None:
                new_k, new_v = layer_caches[:2]

        if last_only and output_slice is not None:
            raise ValueError("Transformer: pass last_only or output_slice, not both")
        if last_only:
            x = x[:, -1]
        elif output_slice is not None:
            start, stop = output_slice
            if not 0 <= start < stop <= t:
                raise ValueError(f"output_slice={output_slice} is not a range of positions "
                                 f"within the {t} of the input")
            x = x[:, start:stop]
        x = RMSNorm(cfg.rms_norm_eps, cfg, name="norm")(x)
        if return_hidden:
            out = x
        else:
            out = _output_head(cfg, embed, x)
            if with_hidden:
                out = (out, x)
        if cache is None:
            return out
        new_cache = KVCache(k=new_k, v=new_v, key_mask=key_mask, index=index + t,
                            prefix_k=cache.prefix_k, prefix_v=cache.prefix_v)
        return out, new_cache


def _output_head(cfg: ModelConfig, embed: nn.Embed, x: jax.Array) -> jax.Array:
    """float32 logits [..., vocab] of final hidden states x [..., hidden]: `lm_head`, or
    the token embedding's transpose when tied. Called inside a module's compact method
    (`Transformer`, `OutputHead`), which then owns the `lm_head` params."""
    if cfg.tie_embeddings:
        out = embed.attend(x).astype(jnp.float32)
    else:
        # On CPU the head's weight gradient is a plain product on a transposed copy of x,
        # twice as fast as XLA's own contraction over the rows (see
        # `matmul_transposed_weight_grad`); elsewhere XLA's own.
        out = Linear(cfg.vocab_size, ("embed", "vocab"), cfg, name="lm_head",
                     transposed_weight_grad=platform() == "cpu")(x)
        out = out.astype(jnp.float32)
    lead = ("activation_batch", "activation_length") + (None,) * max(x.ndim - 3, 0)
    axes = lead[:x.ndim - 1] + ("activation_vocab",)
    return constrain(out, axes)


class OutputHead(nn.Module):
    """`Transformer`'s output head alone, on its own params (`lm_head`, or `embed_tokens`
    when tied): the logits of hidden states that `Transformer(..., return_hidden=True)`
    passes gave, e.g. several passes' states joined into one head matmul."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        embed = token_embedding(self.cfg, name="embed_tokens") if self.cfg.tie_embeddings else None
        return _output_head(self.cfg, embed, hidden)


def head_logits(cfg: ModelConfig, params, hidden: jax.Array, rngs=None) -> jax.Array:
    """float32 logits [..., vocab] of final (normed) hidden states [..., hidden] under the
    model's params: exactly the logits `Transformer` computes from the same states."""
    name = "embed_tokens" if cfg.tie_embeddings else "lm_head"
    return OutputHead(cfg).apply({"params": {name: params[name]}}, hidden, rngs=rngs)


def unstack_layer_params(params, dtype: str | jnp.dtype | None = None):
    """Stacked params -> the "per_layer" layout of `Transformer(cfg, layer_params="per_layer")`.

    Every leaf under `params["layers"]` is sliced along its leading layers axis, whatever
    its name (LoRA adapters, or any other leaf a module adds, travel along), into
    `params["layers_0"] .. params["layers_{L-1}"]`, each with the structure of
    `params["layers"]`; every other entry is passed through untouched. Inside `jit` this
    is one copy of the layer weights; make it once per call, outside any decode loop.

    Args:
      params: a params tree with a stacked `layers` entry (`init_params`, `from_hf`).
      dtype: if set, floating-point layer leaves are also cast to it (pass the model's
        compute dtype `cfg.dtype`: the copy is made anyway, and the result is exact since
        every module casts its params to `cfg.dtype` before use). Integer leaves and the
        entries outside `layers` keep their dtype.

    Returns:
      A new dict (the input is not modified).
    """
    if "layers" not in params:
        raise ValueError(
            "unstack_layer_params: params has no stacked 'layers' entry (top-level keys: "
            f"{sorted(params)}); it expects the stacked layout of init_params / from_hf")
    stacked = params["layers"]
    sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(stacked)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "unstack_layer_params: the leaves under params['layers'] must share one leading "
            f"layers axis, got leading sizes {sorted(sizes, key=str)}")
    (num_layers,) = sizes

    def layer(i):
        sliced = jax.tree.map(lambda x: x[i], stacked)
        return sliced if dtype is None else cast_floating(sliced, dtype)

    out = {k: v for k, v in params.items() if k != "layers"}
    out.update({layer_name(i): layer(i) for i in range(num_layers)})
    return out


def cast_floating(tree, dtype: str | jnp.dtype):
    """`tree` with its floating-point leaves cast to `dtype` (integer leaves kept). For a
    params tree and the model's compute dtype `cfg.dtype` this changes no output: every
    module casts its params to `cfg.dtype` before use, so the cast is only moved earlier
    (once per call rather than at every use, e.g. every decode step)."""
    dtype = jnp.dtype(dtype)

    def needs_cast(x) -> bool:
        return jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype

    if not any(needs_cast(x) for x in jax.tree.leaves(tree)):
        return tree  # already in the compute dtype: no new tree, no copy
    return jax.tree.map(lambda x: x.astype(dtype) if needs_cast(x) else x, tree)


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
