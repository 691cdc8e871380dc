"""Properties of the Linen transformer that hold without a reference implementation."""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.models import KVCache, ModelConfig, Transformer, init_params, tiny
from jaxpost.models.transformer import cast_floating, layer_name, unstack_layer_params

FAMILIES = ("llama", "qwen2", "qwen3")


@functools.lru_cache(maxsize=None)
def _apply(cfg, layer_params="stacked"):
    """Jitted `Transformer(cfg, layer_params).apply` (eager Flax runs op by op: slow on CPU)."""
    def forward(params, tokens, positions=None, segment_ids=None, cache=None, return_hidden=False,
                last_only=False):
        return Transformer(cfg, layer_params=layer_params).apply(
            {"params": params}, tokens, positions=positions, segment_ids=segment_ids,
            cache=cache, return_hidden=return_hidden, last_only=last_only)
    return jax.jit(forward, static_argnames=("return_hidden", "last_only"))


def _tokens(b, t, seed=1, vocab=256):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab, dtype=jnp.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_param_tree_uses_hf_module_names_and_stacked_layers(family):
    cfg = tiny(family)
    params = init_params(cfg, jax.random.key(0))
    paths = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert "embed_tokens/embedding" in paths and "norm/scale" in paths and "lm_head/kernel" in paths
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"layers/self_attn/{name}/kernel" in paths
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert f"layers/mlp/{name}/kernel" in paths
    assert ("layers/self_attn/q_proj/bias" in paths) == (family == "qwen2")
    assert ("layers/self_attn/q_norm/scale" in paths) == (family == "qwen3")
    chex.assert_shape(params["layers"]["self_attn"]["q_proj"]["kernel"], (2, 64, 64))
    chex.assert_shape(params["layers"]["self_attn"]["k_proj"]["kernel"], (2, 64, 32))
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params


def test_tied_embeddings_have_no_lm_head():
    params = init_params(tiny("qwen2", tie_embeddings=True), jax.random.key(0))
    assert "lm_head" not in params


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_unrolled_and_remat_give_the_same_logits(family):
    cfg = tiny(family)
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(2, 9)
    ref = _apply(cfg)(params, tokens)
    chex.assert_shape(ref, (2, 9, cfg.vocab_size))
    assert ref.dtype == jnp.float32
    for variant in (cfg.replace(scan_layers=True), cfg.replace(scan_layers=False),
                    cfg.replace(scan_layers=True, remat_policy="full"),
                    cfg.replace(scan_layers=False, remat_policy="dots")):
        out = _apply(variant)(params, tokens)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_scan_layers_none_unrolls_on_cpu_only_and_an_explicit_choice_wins():
    cfg = tiny("llama")
    assert cfg.scan_layers is None
    assert not cfg.scans_layers("cpu") and cfg.scans_layers("tpu") and cfg.scans_layers("gpu")
    assert cfg.replace(scan_layers=True).scans_layers("cpu")
    assert not cfg.replace(scan_layers=False).scans_layers("tpu")
    # On this CPU backend the default fully unrolls the layer scan; True keeps the loop.
    params = init_params(cfg, jax.random.key(0))

    def unroll(c):
        return re.findall(r"unroll=(\d+)", str(jax.make_jaxpr(_apply(c))(params, _tokens(1, 4))))
    assert unroll(cfg) == [str(cfg.num_layers)]
    assert unroll(cfg.replace(scan_layers=True)) == ["1"]


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_kv_cache_equals_full_forward(family):
    cfg = tiny(family)
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(2, 11)
    model = _apply(cfg)
    full = model(params, tokens)
    cache = KVCache.init(cfg, 2, 16)
    outs = []
    for lo, hi in ((0, 5), (5, 6), (6, 11)):
        logits, cache = model(params, tokens[:, lo:hi], cache=cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert int(cache.index) == 11 and bool(cache.key_mask[:, :11].all())


def test_left_padded_rows_in_cache_match_unpadded_rows():
    cfg = tiny("llama")
    params = init_params(cfg, jax.random.key(0))
    model = _apply(cfg)
    short = _tokens(1, 4, seed=3)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), short], axis=1)
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 1]])
    out, _ = model(params, padded, segment_ids=seg, cache=KVCache.init(cfg, 1, 8))
    ref = model(params, short)
    np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5, rtol=1e-5)
    assert bool(jnp.isfinite(out).all())


def test_packed_segments_equal_separate_forwards():
    cfg = tiny("qwen3")
    params = init_params(cfg, jax.random.key(0))
    model = _apply(cfg)
    a, b = _tokens(1, 5, seed=4), _tokens(1, 3, seed=5)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 3 + [0] * 2])
    pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]])
    out = model(params, packed, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(out[:, :5], model(params, a), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[:, 5:8], model(params, b), atol=1e-5, rtol=1e-5)
    assert bool(jnp.isfinite(out).all())


def test_bfloat16_compute_with_float32_master_weights_is_close():
    cfg = tiny("llama")
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(2, 8)
    ref = _apply(cfg)(params, tokens)
    out = _apply(cfg.replace(dtype="bfloat16"))(params, tokens)
    assert out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref))) < 0.05
    bf16_params = init_params(cfg.replace(param_dtype="bfloat16"), jax.random.key(0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16_params))


def test_return_hidden_gives_final_normed_states():
    cfg = tiny("llama")
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(2, 6)
    hidden = _apply(cfg)(params, tokens, return_hidden=True)
    chex.assert_shape(hidden, (2, 6, cfg.hidden_size))
    logits = hidden @ params["lm_head"]["kernel"]
    np.testing.assert_allclose(logits, _apply(cfg)(params, tokens),
                               atol=1e-5, rtol=1e-5)


def test_inputs_embeds_of_the_token_rows_is_a_no_op_and_an_offset_moves_the_output():
    """The `inputs_embeds` hook: absent, or the token rows themselves (`embed_tokens`), it
    is the plain call; a zero offset changes nothing, a non-zero one does."""
    from jaxpost.models import embed_tokens
    cfg = tiny("llama")
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(2, 6)

    @jax.jit
    def with_offset(params, tokens, offset):
        x = embed_tokens(cfg, params["embed_tokens"]["embedding"], tokens) + offset
        return Transformer(cfg).apply({"params": params}, tokens, inputs_embeds=x)

    plain = _apply(cfg)(params, tokens)
    zero = jnp.zeros((2, 6, cfg.hidden_size))
    chex.assert_trees_all_equal(with_offset(params, tokens, zero), plain)
    moved = with_offset(params, tokens, zero.at[1, 2].set(0.5))
    chex.assert_trees_all_close(moved[0], plain[0])  # other rows, and earlier positions,
    chex.assert_trees_all_close(moved[1, :2], plain[1, :2])  # are causally untouched
    assert float(jnp.abs(moved[1, 2:] - plain[1, 2:]).max(axis=-1).min()) > 1e-6
    with pytest.raises(ValueError, match="inputs_embeds has shape"):
        Transformer(cfg).apply({"params": params}, tokens, inputs_embeds=zero[:, :5])


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_last_only_gives_the_last_position_of_the_full_output(tied):
    cfg = tiny("qwen2", tie_embeddings=tied)
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(2, 7)
    seg = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7])  # left padding, as the sampler writes
    full = _apply(cfg)(params, tokens, segment_ids=seg)
    last = _apply(cfg)(params, tokens, segment_ids=seg, last_only=True)
    chex.assert_shape(last, (2, cfg.vocab_size))
    np.testing.assert_allclose(last, full[:, -1], atol=1e-5, rtol=1e-5)
    hidden = _apply(cfg)(params, tokens, segment_ids=seg, return_hidden=True)
    last_hidden = _apply(cfg)(params, tokens, segment_ids=seg, return_hidden=True, last_only=True)
    chex.assert_shape(last_hidden, (2, cfg.hidden_size))
    np.testing.assert_allclose(last_hidden, hidden[:, -1], atol=1e-5, rtol=1e-5)


class ApplyTest(chex.TestCase):
    """Jitted and eager `apply` agree, and `apply` is a pure function of its inputs."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_apply_is_jittable_and_pure(self):
        cfg = tiny("qwen2")
        params = init_params(cfg, jax.random.key(0))
        before = jax.tree.map(np.array, params)
        tokens = _tokens(2, 6)
        apply = self.variant(lambda p, t: Transformer(cfg).apply({"params": p}, t))
        out = apply(params, tokens)
        chex.assert_shape(out, (2, 6, cfg.vocab_size))
        chex.assert_trees_all_equal(apply(params, tokens), out)  # same inputs, same bits
        chex.assert_trees_all_equal(params, before)  # inputs untouched
        # The eager variant runs Flax op by op: it matches the compiled program.
        chex.assert_trees_all_close(out, _apply(cfg)(params, tokens), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- per-layer layout
def test_unstack_layer_params_slices_every_layer_leaf_whatever_its_name():
    cfg = tiny("llama")
    params = init_params(cfg, jax.random.key(0))
    q = params["layers"]["self_attn"]["q_proj"]
    num_layers, d_in, d_out = q["kernel"].shape
    # Leaves a module might add next to a kernel (LoRA adapters), plus a non-float one.
    q["lora_a"] = jnp.zeros((num_layers, d_in, 4))
    q["lora_b"] = jnp.zeros((num_layers, 4, d_out))
    q["step"] = jnp.arange(num_layers, dtype=jnp.int32)
    out = unstack_layer_params(params, dtype="bfloat16")
    assert set(out) == (set(params) - {"layers"}) | {layer_name(i) for i in range(num_layers)}
    for name in set(params) - {"layers"}:  # untouched, not cast
        assert out[name] is params[name]

    def expected(x, i):  # layer i's slice; floating leaves cast to bfloat16
        x = x[i]
        return x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x

    for i in range(num_layers):
        layer = out[layer_name(i)]
        chex.assert_trees_all_equal_structs(layer, params["layers"])
        chex.assert_trees_all_equal(
            layer, jax.tree.map(functools.partial(expected, i=i), params["layers"]))
    assert out[layer_name(1)]["self_attn"]["q_proj"]["step"].dtype == jnp.int32
    assert "lora_a" not in params["layers"]["self_attn"]["k_proj"]  # input not modified
    assert unstack_layer_params(params)[layer_name(0)]["mlp"]["up_proj"]["kernel"].dtype == (
        jnp.float32)


def test_per_layer_init_has_the_tree_unstack_layer_params_makes():
    cfg = tiny("qwen3")
    per_layer = nn.unbox(jax.eval_shape(lambda: Transformer(cfg, layer_params="per_layer").init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    params = init_params(cfg, jax.random.key(0))
    chex.assert_trees_all_equal_shapes_and_dtypes(unstack_layer_params(params), per_layer)


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_per_layer_layout_gives_the_same_logits_as_stacked(family, tied):
    cfg = tiny(family, tie_embeddings=tied)
    params = init_params(cfg, jax.random.key(0))
    per_layer = unstack_layer_params(params)
    stacked, unstacked = _apply(cfg), _apply(cfg, "per_layer")
    tokens = _tokens(2, 11)
    full = stacked(params, tokens)
    np.testing.assert_allclose(unstacked(per_layer, tokens), full, atol=1e-5, rtol=1e-5)
    # With a cache, in chunks: the same logits, and the same keys/values per layer.
    caches = {"stacked": KVCache.init(cfg, 2, 16),
              "per_layer": KVCache.init(cfg, 2, 16, layer_params="per_layer")}
    assert len(caches["per_layer"].k) == cfg.num_layers and caches["per_layer"].max_len == 16
    for lo, hi in ((0, 5), (5, 6), (6, 11)):
        ref, caches["stacked"] = stacked(params, tokens[:, lo:hi], cache=caches["stacked"])
        out, caches["per_layer"] = unstacked(per_layer, tokens[:, lo:hi],
                                             cache=caches["per_layer"])
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(out, full[:, lo:hi], atol=1e-5, rtol=1e-5)
    for i in range(cfg.num_layers):
        np.testing.assert_allclose(caches["per_layer"].k[i], caches["stacked"].k[i], atol=1e-5)
        np.testing.assert_allclose(caches["per_layer"].v[i], caches["stacked"].v[i], atol=1e-5)
    assert int(caches["per_layer"].index) == 11


def test_per_layer_params_cast_to_the_compute_dtype_give_the_same_logits():
    cfg = tiny("llama", dtype="bfloat16")  # float32 master weights, bfloat16 compute
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(2, 8)
    model = _apply(cfg, "per_layer")
    out = model(unstack_layer_params(params, cfg.dtype), tokens)
    # Exact: every module casts its params to cfg.dtype before use anyway.
    chex.assert_trees_all_equal(out, model(unstack_layer_params(params), tokens))
    # The stacked model fuses differently: equal up to bfloat16 rounding.
    np.testing.assert_allclose(out, _apply(cfg)(params, tokens), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("family,tied", [("qwen2", True), ("qwen3", False)])
def test_stacked_params_cast_to_the_compute_dtype_give_the_same_logits(family, tied):
    # The sampler's path on accelerators: the float32 master weights cast once per call
    # (`cast_floating`) run the model bit for bit as they do uncast, since every module
    # casts its params to cfg.dtype before use (embeddings tied or not, q/k/v biases,
    # norms, qk-norms).
    cfg = tiny(family, tie_embeddings=tied, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    params["layers"]["step"] = jnp.arange(cfg.num_layers, dtype=jnp.int32)  # not floating
    cast = cast_floating(params, cfg.dtype)
    assert cast["layers"]["step"].dtype == jnp.int32
    del params["layers"]["step"], cast["layers"]["step"]
    assert {x.dtype for x in jax.tree.leaves(cast)} == {jnp.dtype(jnp.bfloat16)}
    tokens = _tokens(2, 8)
    model = _apply(cfg)
    chex.assert_trees_all_equal(model(cast, tokens), model(params, tokens))
    assert cast_floating(cast, cfg.dtype) is cast  # nothing left to cast: the same tree


def test_cache_in_the_wrong_layout_or_a_bad_layout_name_is_an_error():
    cfg = tiny("llama")
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match=r"\(layer_params='stacked'\) got a KVCache in the "
                                         r"'per_layer' layout"):
        _apply(cfg)(params, _tokens(1, 2), cache=KVCache.init(cfg, 1, 4, layer_params="per_layer"))
    with pytest.raises(ValueError, match=r"\(layer_params='per_layer'\) got a KVCache in the "
                                         r"'stacked' layout"):
        _apply(cfg, "per_layer")(unstack_layer_params(params), _tokens(1, 2),
                                 cache=KVCache.init(cfg, 1, 4))
    with pytest.raises(ValueError, match="layer_params='scanned'; must be one of"):
        Transformer(cfg, layer_params="scanned").apply({"params": params}, _tokens(1, 2))


@pytest.mark.parametrize("field,value,match", [
    ("family", "gpt2", "family"),
    ("num_kv_heads", 3, "num_kv_heads"),
    ("dtype", "float64", "dtype"),
    ("remat_policy", "everything", "remat_policy"),
    ("hidden_size", 0, "hidden_size"),
])
def test_bad_config_fields_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{"family": "llama", field: value})


def test_llama3_rope_scaling_matches_hand_formula():
    from jaxpost.models import RopeScaling
    cfg = tiny("llama", head_dim=16, rope_theta=500000.0,
               rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
    base = 1.0 / (500000.0 ** (np.arange(0, 16, 2) / 16))
    out = cfg.rope_inv_freq()
    for f0, f in zip(base, out):
        wavelen = 2 * np.pi / f0
        if wavelen < 64 / 4:
            expected = f0
        elif wavelen > 64 / 1:
            expected = f0 / 8
        else:
            smooth = (64 / wavelen - 1) / (4 - 1)
            expected = (1 - smooth) * f0 / 8 + smooth * f0
        np.testing.assert_allclose(f, expected, rtol=1e-6)
    assert isinstance(cfg, ModelConfig)


def test_with_hidden_returns_the_logits_and_hidden_states_of_the_separate_calls():
    cfg = tiny("qwen3", num_layers=1, vocab_size=64, hidden_size=32, intermediate_size=64)
    params = init_params(cfg, jax.random.key(0))
    tokens = _tokens(2, 5, vocab=64)
    model = Transformer(cfg)

    @jax.jit  # one program for the three calls: one compilation
    def calls(p, x):
        return (model.apply({"params": p}, x, with_hidden=True), model.apply({"params": p}, x),
                model.apply({"params": p}, x, return_hidden=True))

    (logits, hidden), want_logits, want_hidden = calls(params, tokens)
    chex.assert_shape(logits, (2, 5, 64))
    chex.assert_shape(hidden, (2, 5, cfg.hidden_size))
    chex.assert_trees_all_close(logits, want_logits, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(hidden, want_hidden, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        model.apply({"params": params}, tokens, with_hidden=True, return_hidden=True)


@pytest.mark.parametrize("case", ["tied", "lora_head"])
def test_head_logits_of_the_hidden_states_are_the_models_logits(case):
    """`head_logits` on `return_hidden` states is the model's own head: the tied
    embedding's transpose when tied, and a LoRA pair on `lm_head` applies too."""
    from jaxpost.models import head_logits
    cfg = tiny("llama", tie_embeddings=case == "tied")
    params = init_params(cfg, jax.random.key(0))
    if case == "lora_head":
        cfg = cfg.replace(lora_scale=0.5)
        r = np.random.default_rng(4)
        params["lm_head"] = dict(
            params["lm_head"],
            lora_a=jnp.asarray(r.standard_normal((cfg.hidden_size, 2)), jnp.float32),
            lora_b=jnp.asarray(r.standard_normal((2, cfg.vocab_size)), jnp.float32))
    tokens = _tokens(2, 6)
    hidden = _apply(cfg)(params, tokens, return_hidden=True)
    logits = jax.jit(functools.partial(head_logits, cfg))(params, hidden)
    chex.assert_shape(logits, (2, 6, cfg.vocab_size))
    assert logits.dtype == jnp.float32
    chex.assert_trees_all_close(logits, _apply(cfg)(params, tokens), atol=1e-5, rtol=1e-5)
    if case == "lora_head":  # the adapter moved the logits
        base = dict(params, lm_head={"kernel": params["lm_head"]["kernel"]})
        assert float(jnp.max(jnp.abs(head_logits(cfg, base, hidden) - logits))) > 1e-2
