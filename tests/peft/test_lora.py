"""LoRA adapters: forward = merged forward, targets and masks, init, sharding, PEFT parity."""

import dataclasses
import functools
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.models import (
    KVCache, Transformer, param_logical_axes, param_shapes, tiny, to_hf)
from jaxpost.peft import lora
from jaxpost.peft.lora import LoraConfig, LoraError
from jaxpost.sharding import MeshConfig, logical_to_shardings, make_mesh

VOCAB = 256
Q = ("layers", "self_attn", "q_proj")


# ----------------------------------------------------------------------------- helpers
def _tokens(b=2, t=12, seed=1):
    return np.random.RandomState(seed).randint(0, VOCAB, (b, t)).astype(np.int32)


def _random_params(cfg, seed=0):
    """Random params over `param_shapes` (numpy draws: no op-by-op init), non-zero biases."""
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray((base + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32),
                           leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


def _with_random_b(params, lc, seed=0, std=0.3):
    """`params` with fresh adapters whose B is random (zero in untargeted layers)."""
    adapters = lora.init_adapters(params, lc, jax.random.key(seed))
    targets = lora.lora_targets(params, lc)
    rng = np.random.RandomState(seed + 100)
    for path, layers in targets.items():
        node = functools.reduce(lambda tree, k: tree[k], path[:-1], adapters)
        b = std * rng.standard_normal(node["lora_b"].shape).astype(np.float32)
        if layers is not None:
            b = b * layers[:, None, None]
        node["lora_b"] = jnp.asarray(b)
    return lora.attach_adapters(params, adapters)


@functools.lru_cache(maxsize=None)
def _forward_fn(cfg):
    return jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))


def _logits(cfg, params, tokens):
    return np.asarray(_forward_fn(cfg)(params, jnp.asarray(tokens)))


FAMILIES = ("llama", "qwen2")  # qwen2: q/k/v biases next to the adapted kernels
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
              "lm_head")


# ------------------------------------------------------------------------ config
def test_scale_is_alpha_over_rank_or_over_sqrt_rank_with_rslora():
    assert LoraConfig(rank=16, alpha=8).scale == 0.5
    assert LoraConfig(rank=16, alpha=8, rslora=True).scale == 2.0
    assert LoraConfig(rank=0).scale == 0.0 and not LoraConfig().enabled
    cfg = lora.with_lora(tiny(), LoraConfig(rank=4, alpha=8, dropout=0.1))
    assert (cfg.lora_scale, cfg.lora_dropout) == (2.0, 0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=-1), r"lora\.rank"),
    (dict(rank=4, dropout=1.0), r"lora\.dropout"),
    (dict(rank=4, alpha=0.0), r"lora\.alpha"),
    (dict(rank=4, targets=()), r"lora\.targets is empty"),
    (dict(rank=4, targets="q_proj"), r"lora\.targets='q_proj' is a string"),
    (dict(rank=4, targets=("q_proj", "(")), r"lora\.targets\[1\]='\('"),
])
def test_bad_lora_config_fields_are_named(kwargs, match):
    with pytest.raises(LoraError, match=match):
        LoraConfig(**kwargs)


def test_lora_fields_never_reach_the_hf_config():
    cfg = tiny().replace(lora_scale=2.0, lora_dropout=0.1)
    hf = cfg.to_hf_config()
    assert not any("lora" in k for k in hf) and hf == tiny().to_hf_config()
    assert type(cfg).from_dict(dataclasses.asdict(cfg)) == cfg


# ----------------------------------------------------------------------- targets
def test_layer_restricted_targets_give_layer_masks_and_zero_untargeted_adapters():
    cfg = tiny("llama", num_layers=3)
    lc = LoraConfig(rank=4, alpha=8, targets=(r"model\.layers\.[02]\.self_attn\.q_proj",
                                               r"layers\.1\.mlp\.down_proj", "lm_head"))
    targets = lora.lora_targets(param_shapes(cfg), lc)
    assert list(targets) == [("layers", "mlp", "down_proj", "kernel"), Q + ("kernel",),
                             ("lm_head", "kernel")]
    np.testing.assert_array_equal(targets[Q + ("kernel",)], [True, False, True])
    np.testing.assert_array_equal(targets[("layers", "mlp", "down_proj", "kernel")],
                                  [False, True, False])
    assert targets[("lm_head", "kernel")] is None
    adapters = lora.init_adapters(param_shapes(cfg), lc, jax.random.key(0))
    a = np.asarray(adapters["layers"]["self_attn"]["q_proj"]["lora_a"])
    assert np.all(a[1] == 0) and np.all(a[[0, 2]] != 0)
    assert np.all(np.asarray(adapters["layers"]["mlp"]["down_proj"]["lora_a"])[[0, 2]] == 0)
    mask = lora.adapter_mask(targets)
    np.testing.assert_array_equal(mask["layers"]["self_attn"]["q_proj"]["lora_b"], [1, 0, 1])
    assert mask["lm_head"] == {"lora_a": True, "lora_b": True}
    chex.assert_trees_all_equal_structs(mask, jax.tree.map(lambda _: True, adapters))


def test_q_proj_target_skips_its_bias_and_adapts_every_layer():
    targets = lora.lora_targets(param_shapes(tiny("qwen2")),
                                LoraConfig(rank=2, targets=("q_proj",)))
    assert list(targets) == [Q + ("kernel",)]
    np.testing.assert_array_equal(targets[Q + ("kernel",)], [True, True])


@pytest.mark.parametrize("target, match", [
    ("qq_proj", r"lora\.targets\[1\]='qq_proj' matches no Linear weight; .*"
                r"model\.layers\.0\.self_attn\.q_proj\.weight"),
    ("embed_tokens",
     r"lora\.targets\[1\]='embed_tokens' matches \['model\.embed_tokens\.weight'\]"),
    ("layernorm", r"'layernorm' matches \['model\.layers\.0\.input_layernorm\.weight'"),
    ("self_attn", r"q_norm"),  # qwen3: the q/k norms live under self_attn
])
def test_bad_targets_raise_naming_the_regex(target, match):
    shapes = param_shapes(tiny("qwen3"))
    with pytest.raises(LoraError, match=match):
        lora.lora_targets(shapes, LoraConfig(rank=2, targets=("v_proj", target)))


def test_lm_head_target_of_a_tied_model_matches_nothing():
    with pytest.raises(LoraError, match="'lm_head' matches no Linear weight"):
        lora.lora_targets(param_shapes(tiny(tie_embeddings=True)),
                          LoraConfig(rank=2, targets=("lm_head",)))


# -------------------------------------------------------------------------- init
class InitTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_a_is_kaiming_uniform_like_peft_and_b_is_zero(self):
        cfg = tiny("llama", hidden_size=256, intermediate_size=256, num_heads=4, head_dim=64)
        shapes = param_shapes(cfg)
        lc = LoraConfig(rank=8, targets=("q_proj", "down_proj"))
        adapters = self.variant(functools.partial(lora.init_adapters, shapes, lc))(
            jax.random.key(0))
        q, down = adapters["layers"]["self_attn"]["q_proj"], adapters["layers"]["mlp"]["down_proj"]
        chex.assert_shape([q["lora_a"], q["lora_b"]], [(2, 256, 8), (2, 8, 256)])
        chex.assert_shape(down["lora_a"], (2, 256, 8))
        a = np.asarray(q["lora_a"])
        bound = 1 / math.sqrt(256)  # kaiming_uniform_(a=sqrt(5)) on [r, in]: U(±1/sqrt(in))
        assert a.min() >= -bound and a.max() <= bound
        np.testing.assert_allclose(a.std(), bound / math.sqrt(3), rtol=0.05)
        assert not np.allclose(a[0], a[1])  # each layer draws its own A
        assert np.all(np.asarray(q["lora_b"]) == 0)
        assert q["lora_a"].dtype == shapes["layers"]["self_attn"]["q_proj"]["kernel"].dtype

    def test_adapters_take_the_kernels_param_dtype(self):
        shapes = param_shapes(tiny(param_dtype="bfloat16"))
        adapters = lora.init_adapters(shapes, LoraConfig(rank=2), jax.random.key(0))
        assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.bfloat16)}


def test_adapters_shard_like_their_kernel():
    cfg = tiny("llama")
    lc = LoraConfig(rank=4, targets=("q_proj", "o_proj", "lm_head"))
    targets = lora.lora_targets(param_shapes(cfg), lc)
    axes = lora.adapter_logical_axes(param_logical_axes(cfg), targets)
    assert tuple(axes["layers"]["self_attn"]["q_proj"]["lora_a"]) == ("layers", "embed", None)
    assert tuple(axes["layers"]["self_attn"]["o_proj"]["lora_b"]) == ("layers", None, "embed")
    assert tuple(axes["lm_head"]["lora_b"]) == (None, "vocab")
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    shapes = jax.eval_shape(lambda: lora.init_adapters(param_shapes(cfg), lc, jax.random.key(0)))
    shardings = logical_to_shardings(axes, shapes, mesh)
    q = shardings["layers"]["self_attn"]["q_proj"]
    assert tuple(q["lora_a"].spec) == (None, "fsdp", None)  # in: like the kernel's
    assert tuple(q["lora_b"].spec) == (None, None, "tensor")  # out: like the kernel's
    adapters = jax.jit(lambda k: lora.init_adapters(param_shapes(cfg), lc, k),
                       out_shardings=shardings)(jax.random.key(0))
    assert adapters["lm_head"]["lora_b"].sharding.spec == shardings["lm_head"]["lora_b"].spec


# ----------------------------------------------------------------------- forward
@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_b_adapters_leave_logits_unchanged(family, scan_layers):
    cfg = tiny(family, scan_layers=scan_layers)
    params = _random_params(cfg)
    lc = LoraConfig(rank=4, alpha=16, targets=ALL_LINEAR)
    with_adapters = lora.attach_adapters(params, lora.init_adapters(params, lc, jax.random.key(1)))
    tokens = _tokens()
    chex.assert_trees_all_close(_logits(lora.with_lora(cfg, lc), with_adapters, tokens),
                                _logits(cfg, params, tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_forward_equals_merged_forward(family, scan_layers):
    cfg = tiny(family, scan_layers=scan_layers)
    params = _random_params(cfg)
    lc = LoraConfig(rank=4, alpha=8, targets=(r"layers\.1\.self_attn\.q_proj", "v_proj",
                                               "down_proj", "lm_head"))
    with_adapters = _with_random_b(params, lc)
    merged = lora.merge_adapters(with_adapters, lc.scale)
    chex.assert_trees_all_equal_structs(merged, params)
    tokens = _tokens()
    lora_logits = _logits(lora.with_lora(cfg, lc), with_adapters, tokens)
    chex.assert_trees_all_close(lora_logits, _logits(cfg, merged, tokens), atol=2e-5, rtol=0)
    assert np.abs(lora_logits - _logits(cfg, params, tokens)).max() > 1e-2  # B matters


def test_kv_cache_decode_with_adapters_equals_full_forward():
    cfg = lora.with_lora(tiny("qwen2"), LoraConfig(rank=4, alpha=8, targets=ALL_LINEAR))
    params = _with_random_b(_random_params(cfg), LoraConfig(rank=4, alpha=8, targets=ALL_LINEAR))
    tokens = jnp.asarray(_tokens(2, 9))
    model = jax.jit(lambda p, t, c: Transformer(cfg).apply({"params": p}, t, cache=c))
    cache = KVCache.init(cfg, 2, 12)
    outs = []
    for lo, hi in ((0, 5), (5, 6), (6, 9)):  # prefill, then decode steps, as the sampler does
        logits, cache = model(params, tokens[:, lo:hi], cache)
        outs.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(outs, 1), _logits(cfg, params, tokens),
                                atol=1e-5, rtol=1e-5)


class MergeTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_merged_kernel_is_w_plus_scale_a_b(self):
        cfg = tiny("qwen2")
        lc = LoraConfig(rank=4, alpha=8, targets=(r"layers\.1\.self_attn\.q_proj", "lm_head"),
                        rslora=True)
        params = _with_random_b(_random_params(cfg), lc)
        merged = self.variant(functools.partial(lora.merge_adapters, scale=lc.scale))(params)
        q = params["layers"]["self_attn"]["q_proj"]
        w, a, b = (np.asarray(q[k], np.float64) for k in ("kernel", "lora_a", "lora_b"))
        want = w + lc.scale * np.einsum("lir,lro->lio", a, b)
        chex.assert_trees_all_close(merged["layers"]["self_attn"]["q_proj"]["kernel"],
                                    want.astype(np.float32), atol=1e-6, rtol=0)
        np.testing.assert_array_equal(merged["layers"]["self_attn"]["q_proj"]["kernel"][0],
                                      q["kernel"][0])  # untargeted layer: unchanged
        h = params["lm_head"]
        chex.assert_trees_all_close(
            merged["lm_head"]["kernel"],
            np.asarray(h["kernel"]) + lc.scale * np.asarray(h["lora_a"]) @ np.asarray(h["lora_b"]),
            atol=1e-6, rtol=0)
        assert "bias" in merged["layers"]["self_attn"]["q_proj"]
        assert not lora.has_adapters(merged)

    @chex.variants(with_jit=True, without_jit=True)
    def test_strip_adapters_gives_the_base_params(self):
        params = _random_params(tiny())
        with_adapters = _with_random_b(params, LoraConfig(rank=2, targets=("o_proj",)))
        stripped = self.variant(lora.strip_adapters)(with_adapters)
        chex.assert_trees_all_equal(stripped, params)


def test_adapters_without_lora_scale_raise():
    cfg = tiny()
    params = _with_random_b(_random_params(cfg), LoraConfig(rank=2, targets=("o_proj",)))
    with pytest.raises(ValueError,
                       match="layers/self_attn/o_proj hold LoRA adapters.*lora_scale is 0"):
        Transformer(cfg).apply({"params": params}, jnp.asarray(_tokens()))


def test_to_hf_of_params_with_adapters_points_to_merge(tmp_path):
    cfg = tiny()
    params = _with_random_b(_random_params(cfg), LoraConfig(rank=2, targets=("o_proj",)))
    with pytest.raises(ValueError, match="merge_adapters"):
        to_hf(cfg, params, tmp_path)


def test_lora_dropout_applies_only_with_a_dropout_rng():
    cfg = tiny()
    lc = LoraConfig(rank=4, alpha=8, targets=ALL_LINEAR, dropout=0.5)
    params = _with_random_b(_random_params(cfg), lc)
    model = Transformer(lora.with_lora(cfg, lc))
    tokens = jnp.asarray(_tokens())
    apply = jax.jit(lambda p, t, rng: model.apply({"params": p}, t, rngs={"dropout": rng}))
    plain = _logits(lora.with_lora(cfg, lc), params, tokens)
    no_dropout = _logits(lora.with_lora(cfg, LoraConfig(rank=4, alpha=8, targets=ALL_LINEAR)),
                         params, tokens)
    chex.assert_trees_all_close(plain, no_dropout, atol=0, rtol=0)  # no rng: deterministic
    d1 = np.asarray(apply(params, tokens, jax.random.key(1)))
    d2 = np.asarray(apply(params, tokens, jax.random.key(2)))
    assert np.abs(d1 - plain).max() > 1e-3 and np.abs(d1 - d2).max() > 1e-3
    chex.assert_trees_all_close(np.asarray(apply(params, tokens, jax.random.key(1))), d1)
    base = Transformer(cfg)  # no adapters: a dropout rng changes nothing
    base_params = lora.strip_adapters(params)
    with_rng = jax.jit(
        lambda p, t: base.apply({"params": p}, t, rngs={"dropout": jax.random.key(1)}))
    chex.assert_trees_all_close(np.asarray(with_rng(base_params, tokens)),
                                _logits(cfg, base_params, tokens), atol=0, rtol=0)


def test_adapters_on_a_reward_model_tree():
    from jaxpost.rl.reward_model import init_head, reward_scores
    cfg = tiny()
    rm = {"model": _random_params(cfg), "score": init_head(cfg, jax.random.key(3), std=0.1)}
    lc = LoraConfig(rank=4, alpha=8, targets=(r"model\.layers\.0\.mlp\.up_proj", "q_proj"))
    targets = lora.lora_targets(rm, lc)
    assert list(targets) == [("model",) + ("layers", "mlp", "up_proj", "kernel"),
                             ("model",) + Q + ("kernel",)]
    with_adapters = _with_random_b(rm, lc)
    assert set(with_adapters["model"]["layers"]["mlp"]["up_proj"]) == {"kernel", "lora_a", "lora_b"}
    merged = lora.merge_adapters(with_adapters, lc.scale)
    chex.assert_trees_all_equal_structs(merged, rm)
    chex.assert_trees_all_equal(lora.strip_adapters(with_adapters), rm)
    tokens = jnp.asarray(_tokens())
    seg = jnp.ones_like(tokens)
    scores = reward_scores(lora.with_lora(cfg, lc), with_adapters, tokens, seg)
    chex.assert_trees_all_close(scores, reward_scores(cfg, merged, tokens, seg), atol=1e-5)
    assert np.abs(np.asarray(scores - reward_scores(cfg, rm, tokens, seg))).max() > 1e-4
    with pytest.raises(LoraError, match="reward head"):
        lora.lora_targets(rm, LoraConfig(rank=2, targets=("score",)))
    with pytest.raises(LoraError, match="reward-model params"):
        lora.save_peft_adapter(cfg, lc, with_adapters, "/nonexistent", "base")


# ------------------------------------------------------------------------ PEFT export
def _read_safetensors(path):
    from safetensors.numpy import load_file
    return dict(load_file(path))


def test_peft_adapter_folder_has_peft_names_and_layouts(tmp_path):
    cfg = tiny("llama")
    lc = LoraConfig(rank=4, alpha=8, targets=(r"layers\.1\.self_attn\.q_proj", "v_proj", "lm_head"))
    params = _with_random_b(_random_params(cfg), lc)
    lora.save_peft_adapter(cfg, lc, params, tmp_path, "/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout",
                                   "use_rslora", "bias", "base_model_name_or_path")} == dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
        use_rslora=False, bias="none", base_model_name_or_path="/base")
    assert config["target_modules"] == (
        r"model\.layers\.(?:1)\.(?:self_attn\.q_proj)|model\.layers\.(?:0|1)\.(?:self_attn\.v_proj)"
        r"|lm_head")
    tensors = _read_safetensors(tmp_path / "adapter_model.safetensors")
    p = "base_model.model."
    assert sorted(tensors) == sorted(
        [f"{p}model.layers.1.self_attn.q_proj.lora_{x}.weight" for x in "AB"]
        + [f"{p}model.layers.{i}.self_attn.v_proj.lora_{x}.weight" for i in (0, 1) for x in "AB"]
        + [f"{p}lm_head.lora_{x}.weight" for x in "AB"])
    v = params["layers"]["self_attn"]["v_proj"]
    np.testing.assert_array_equal(tensors[f"{p}model.layers.0.self_attn.v_proj.lora_A.weight"],
                                  np.asarray(v["lora_a"][0]).T)  # [r, in]
    np.testing.assert_array_equal(tensors[f"{p}model.layers.1.self_attn.v_proj.lora_B.weight"],
                                  np.asarray(v["lora_b"][1]).T)  # [out, r]
    full = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    lora.save_peft_adapter(cfg, full, _with_random_b(_random_params(cfg), full), tmp_path, "/b")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "q_proj", "v_proj"]


def test_peft_export_rejects_adapters_the_config_does_not_name(tmp_path):
    cfg = tiny()
    params = _with_random_b(_random_params(cfg), LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    with pytest.raises(LoraError, match="v_proj/lora_a.*do not pick"):
        lora.save_peft_adapter(cfg, LoraConfig(rank=4, targets=("q_proj",)), params, tmp_path, "b")
    with pytest.raises(LoraError, match="rank=2 implies"):
        lora.save_peft_adapter(cfg, LoraConfig(rank=2, targets=("q_proj", "v_proj")), params,
                               tmp_path, "b")


PEFT_CASES = {
    # name: (family, LoraConfig kwargs)
    "llama_all_layers": ("llama", dict(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj",
                                                                  "lm_head"))),
    "qwen2_layer_restricted_rslora": ("qwen2", dict(
        rank=4, alpha=4, rslora=True, targets=(r"model\.layers\.[0]\.self_attn\.q_proj", "k_proj",
                                                r"layers\.1\.mlp\.(gate|up)_proj"))),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_loads_the_adapter_with_jaxposts_logits(case, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    family, kw = PEFT_CASES[case]
    cfg = tiny(family)
    lc = LoraConfig(**kw)
    params = _with_random_b(_random_params(cfg), lc, std=0.5)
    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    to_hf(cfg, params=lora.strip_adapters(params), path=base_dir)
    lora.save_peft_adapter(cfg, lc, params, adapter_dir, str(base_dir))
    to_hf(cfg, lora.merge_adapters(params, lc.scale), merged_dir)

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, attn_implementation="eager").eval()

    base = load(base_dir)
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    assert isinstance(peft_model.peft_config["default"].target_modules,
                      str if "restricted" in case else set)
    tokens = _tokens()
    with torch.no_grad():
        peft_logits = peft_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        merged_logits = load(merged_dir)(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = _logits(lora.with_lora(cfg, lc), params, tokens)
    assert np.abs(ours - _logits(cfg, lora.strip_adapters(params), tokens)).max() > 1e-2
    np.testing.assert_allclose(peft_logits, ours, atol=1e-4, rtol=0)
    np.testing.assert_allclose(merged_logits, ours, atol=1e-4, rtol=0)

    # PEFT's own save of an adapter with the same config: the same key names and shapes
    # (PEFT also saves lm_head's base weight, `lm_head.base_layer.weight`, when it adapts it).
    target_modules = json.loads((adapter_dir / "adapter_config.json").read_text())["target_modules"]
    own = peft.get_peft_model(load(base_dir), peft.LoraConfig(
        r=lc.rank, lora_alpha=lc.alpha, use_rslora=lc.rslora, task_type="CAUSAL_LM",
        target_modules=target_modules))
    own.save_pretrained(tmp_path / "peft_own")
    own_tensors = _read_safetensors(tmp_path / "peft_own" / "adapter_model.safetensors")
    own_shapes = {k: v.shape for k, v in own_tensors.items() if ".base_layer." not in k}
    ours_tensors = _read_safetensors(adapter_dir / "adapter_model.safetensors")
    assert own_shapes == {k: v.shape for k, v in ours_tensors.items()}


@pytest.mark.parametrize("unstack,on_mesh", [
    pytest.param(True, False, marks=pytest.mark.slow),  # 17 s: over the not-slow budget
    pytest.param(False, False, marks=pytest.mark.slow),
    pytest.param(True, True, marks=pytest.mark.slow)])
def test_sampling_with_adapters_equals_sampling_from_the_merged_model(unstack, on_mesh):
    from jaxpost.sampling import Sampler, SamplingConfig
    from jaxpost.sharding import param_shardings

    base_cfg = tiny("qwen2", num_layers=2, vocab_size=VOCAB)
    lc = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj", "lm_head"))
    cfg = lora.with_lora(base_cfg, lc)
    params = _with_random_b(_random_params(base_cfg), lc)
    merged = lora.merge_adapters(params, lc.scale)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)) if on_mesh else None
    if on_mesh:  # adapters sharded like their base, as the recipes place them
        targets = lora.lora_targets(params, lc)
        shardings = {**param_shardings(base_cfg, mesh)}
        adapter_sh = logical_to_shardings(
            lora.adapter_logical_axes(param_logical_axes(base_cfg), targets),
            lora.init_adapters(params, lc, jax.random.key(0)), mesh)
        params = jax.device_put(params, lora.attach_adapters(shardings, adapter_sh))
    prompts = _tokens(b=8, t=6)
    lengths = np.array([6, 3, 5, 6, 1, 4, 6, 2], np.int32)
    greedy = None
    for temperature in (0.0, 1.0):
        scfg = SamplingConfig(max_new_tokens=5, temperature=temperature, eos_ids=())
        with_adapters = Sampler(cfg, mesh, unstack_layers=unstack)(
            params, prompts, lengths, jax.random.key(7), scfg)
        from_merged = Sampler(base_cfg, mesh, unstack_layers=unstack)(
            merged, prompts, lengths, jax.random.key(7), scfg)
        np.testing.assert_array_equal(np.asarray(with_adapters.tokens),
                                      np.asarray(from_merged.tokens))
        np.testing.assert_allclose(np.asarray(with_adapters.logprobs),
                                   np.asarray(from_merged.logprobs), atol=2e-5)
        greedy = greedy or with_adapters
    # ... and the adapters matter: the base alone samples something else.
    plain = Sampler(base_cfg, mesh, unstack_layers=unstack)(
        lora.strip_adapters(params), prompts, lengths, jax.random.key(7),
        SamplingConfig(max_new_tokens=5, temperature=0.0, eos_ids=()))
    assert np.abs(np.asarray(plain.logprobs) - np.asarray(greedy.logprobs)).max() > 1e-3


# ------------------------------------------------------- several adapter pairs per kernel
def _two_adapter_params(cfg, lc):
    """Params with two adapter pairs per target (lora_*, lora_*_align), both B random."""
    first = _with_random_b(_random_params(cfg), lc, seed=0)
    second = _with_random_b(_random_params(cfg), lc, seed=1)
    extra = lora.rename_adapters(
        jax.tree.map(lambda x: x, {"layers": {"self_attn": {k: {
            leaf: second["layers"]["self_attn"][k][leaf] for leaf in ("lora_a", "lora_b")}
            for k in ("q_proj", "v_proj")}}}), "_align")
    return lora.attach_adapters(first, extra)


@pytest.mark.slow
def test_two_adapter_pairs_apply_as_their_sum_and_merge_to_it():
    cfg = tiny("qwen2", num_layers=2, vocab_size=VOCAB)
    lc = LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    params = _two_adapter_params(cfg, lc)
    assert lora.adapter_suffixes(params) == ("", "_align")
    tokens = _tokens()
    ours = _logits(lora.with_lora(cfg, lc), params, tokens)
    merged = _logits(cfg, lora.merge_adapters(params, lc.scale), tokens)
    one = lora.strip_adapters(params)  # neither pair: differs
    np.testing.assert_allclose(ours, merged, atol=1e-4, rtol=0)
    assert np.abs(ours - _logits(cfg, one, tokens)).max() > 1e-2


@pytest.mark.slow
def test_peft_loads_two_adapter_pairs_as_one_adapter_of_their_summed_rank(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = tiny("llama", num_layers=2, vocab_size=VOCAB)
    lc = LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj"), rslora=True)
    params = _two_adapter_params(cfg, lc)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    to_hf(cfg, params=lora.strip_adapters(params), path=base_dir)
    lora.save_peft_adapter(cfg, lc, params, adapter_dir, str(base_dir))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4
    np.testing.assert_allclose(config["lora_alpha"], lc.scale * 2.0)  # alpha'/sqrt(4) = s
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base.eval(), adapter_dir).eval()
    tokens = _tokens()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, _logits(lora.with_lora(cfg, lc), params, tokens),
                               atol=1e-4, rtol=0)
