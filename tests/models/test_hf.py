"""HF checkpoint conversion: parity with transformers, round trips, sharding, errors."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxpost.models import (
    SUPPORTED_ARCHITECTURES, HFCheckpointError, ModelConfig, RopeScaling, Transformer,
    UnsupportedModelError, from_hf, init_params, param_shapes, tiny, to_hf)
from jaxpost.models import hf as hf_lib
from jaxpost.sharding import MeshConfig, make_mesh, param_shardings

FAMILIES = ("llama", "qwen2", "qwen3")
VOCAB = 256


# ----------------------------------------------------------------------------- helpers
def _tokens(b=2, t=24, seed=1):
    # One shape throughout, so the op-by-op compilations of `apply` are shared.
    return np.random.RandomState(seed).randint(0, VOCAB, (b, t)).astype(np.int32)


def _logits(cfg, params, tokens, segment_ids=None):
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), segment_ids=seg))


def _random_params(cfg, seed=0):
    """Random params of `Transformer(cfg)`: norm scales around 1, non-zero biases.

    Drawn with numpy over `param_shapes` (no op-by-op `init`, which is slow on CPU).
    """
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        base = 1.0 if path[-1].key == "scale" else 0.0
        x = base + 0.1 * rng.standard_normal(leaf.shape)
        return jnp.asarray(x.astype(np.float32), leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


def _hf_config(family, **kw):
    transformers = pytest.importorskip("transformers")
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[family]
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                max_position_embeddings=128, tie_word_embeddings=False)
    base.update(kw)
    return cls(**base)


def _save_random_hf(family, path, seed=0, **kw):
    """A random tiny transformers model of `family`, saved to `path`; returns it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        _hf_config(family, **kw), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    model.eval()
    model.save_pretrained(path)
    return model


def _hf_logits(model, tokens, attention_mask=None):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return model(torch.tensor(tokens, dtype=torch.long), attention_mask=mask).logits.numpy()


def _load_hf(path):
    """transformers' model for a folder, asserting it found exactly the expected tensors."""
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    model.eval()
    return model


def _rewrite_weights(path, edit):
    """Applies `edit(dict name -> np.ndarray)` to the single model.safetensors of `path`."""
    from safetensors.numpy import load_file, save_file
    file = os.path.join(path, "model.safetensors")
    tensors = dict(load_file(file))
    edit(tensors)
    save_file(tensors, file)


def _has(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _assert_trees_bitwise_equal(a, b):
    chex.assert_trees_all_equal_structs(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


# ------------------------------------------------------------- parity with transformers
PARITY_CASES = {
    "llama": ("llama", {}),
    "llama_llama3_rope": ("llama", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "qwen2_untied": ("qwen2", {}),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", {}),
    "qwen3_tied": ("qwen3", dict(tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_equal_transformers_in_float32(case, tmp_path):
    family, kw = PARITY_CASES[case]
    model = _save_random_hf(family, tmp_path, **kw)
    cfg, params = from_hf(tmp_path)
    assert cfg.family == family
    assert cfg.tie_embeddings == kw.get("tie_word_embeddings", False)
    assert ("lm_head" in params) != cfg.tie_embeddings
    if "rope_scaling" in kw:
        assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
        assert cfg.rope_theta == 500000.0
    tokens = _tokens()
    np.testing.assert_allclose(_logits(cfg, params, tokens), _hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_padded_batch_logits_equal_transformers_on_valid_positions(tmp_path):
    model = _save_random_hf("llama", tmp_path)
    cfg, params = from_hf(tmp_path)
    tokens = _tokens(seed=2)
    mask = np.ones(tokens.shape, np.int32)
    mask[0, :5] = 0  # left padded
    mask[1, 17:] = 0  # right padded
    ours = _logits(cfg, params, tokens, segment_ids=mask)
    ref = _hf_logits(model, tokens, attention_mask=mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_from_hf_params_have_the_structure_of_init_params(tmp_path):
    _save_random_hf("qwen2", tmp_path)
    cfg, params = from_hf(tmp_path)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        params, jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))
    assert isinstance(params, dict) and isinstance(params["layers"], dict)


def test_transformers5_rope_parameters_and_legacy_rope_theta_read_alike(tmp_path):
    _save_random_hf("llama", tmp_path, rope_theta=500000.0)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_theta" not in written  # transformers 5 form
    cfg, _ = from_hf(tmp_path)
    assert cfg.rope_theta == 500000.0
    legacy = {k: v for k, v in written.items() if k != "rope_parameters"}
    legacy["rope_theta"] = 500000.0
    assert ModelConfig.from_hf_config(legacy).replace(param_dtype="float32") == cfg
    llama3 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8192)
    v5 = ModelConfig.from_hf_config({**legacy, "rope_theta": None, "rope_parameters": {
        "rope_theta": 500000.0, **llama3}})
    v4 = ModelConfig.from_hf_config({**legacy, "rope_scaling": llama3})
    assert v5 == v4 and v5.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)


# ----------------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_of_to_hf_is_bitwise_identity(family, tmp_path):
    cfg = tiny(family, tie_embeddings=family == "qwen3", bos_token_id=1, eos_token_ids=(2, 3))
    params = _random_params(cfg)
    to_hf(cfg, params, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": [2, 3]}
    cfg2, params2 = from_hf(tmp_path)
    assert cfg2 == cfg
    _assert_trees_bitwise_equal(params2, params)


def test_bfloat16_round_trip_is_bitwise(tmp_path):
    cfg = tiny("qwen2", param_dtype="bfloat16")
    params = _random_params(cfg)
    assert params["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    to_hf(cfg, params, tmp_path)
    infos = hf_lib._read_header(str(tmp_path / "model.safetensors"))
    assert {i.dtype for i in infos} == {np.dtype(ml_dtypes.bfloat16)}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    cfg2, params2 = from_hf(tmp_path, dtype=jnp.bfloat16)
    assert cfg2.param_dtype == "bfloat16"
    _assert_trees_bitwise_equal(params2, params)


def test_from_hf_casts_to_the_requested_dtype(tmp_path):
    cfg = tiny("llama")
    params = _random_params(cfg)
    to_hf(cfg, params, tmp_path)
    cfg2, params2 = from_hf(tmp_path, dtype="bfloat16")
    assert cfg2.param_dtype == "bfloat16" and cfg2.dtype == "float32"
    _assert_trees_bitwise_equal(params2, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_to_hf_output_with_the_same_logits(family, tmp_path):
    pytest.importorskip("torch")
    overrides = dict(llama=dict(rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64)),
                     qwen2=dict(tie_embeddings=True), qwen3={})[family]
    cfg = tiny(family, bos_token_id=1, eos_token_ids=(2,), **overrides)
    params = _random_params(cfg)
    to_hf(cfg, params, tmp_path)
    model = _load_hf(tmp_path)
    assert model.generation_config.eos_token_id == 2
    tokens = _tokens()
    np.testing.assert_allclose(_hf_logits(model, tokens), _logits(cfg, params, tokens), atol=1e-4, rtol=0)


def test_sharded_writing_produces_an_index_and_reads_back(tmp_path):
    cfg = tiny("qwen3")
    params = _random_params(cfg)
    to_hf(cfg, params, tmp_path, max_shard_size_bytes=64 * 1024)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(files) > 2 and "model.safetensors" not in files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    assert len(index["weight_map"]) == 3 + 11 * cfg.num_layers  # embed, norm, head + per layer
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert index["metadata"]["total_size"] == total
    _, params2 = from_hf(tmp_path)
    _assert_trees_bitwise_equal(params2, params)
    if _has("transformers") and _has("torch"):
        model = _load_hf(tmp_path)
        tokens = _tokens()
        np.testing.assert_allclose(_hf_logits(model, tokens), _logits(cfg, params, tokens), atol=1e-4)


def test_to_hf_gathers_sharded_params(tmp_path):
    cfg = tiny("llama")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = _random_params(cfg)
    sharded = jax.tree.map(jax.device_put, params, param_shardings(cfg, mesh))
    to_hf(cfg, sharded, tmp_path)
    _, params2 = from_hf(tmp_path)
    _assert_trees_bitwise_equal(params2, params)


# ------------------------------------------------------------------------- placement
def test_from_hf_onto_a_mesh_has_param_shardings_and_the_same_logits(tmp_path):
    cfg = tiny("qwen2")
    params = _random_params(cfg)
    to_hf(cfg, params, tmp_path)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg2, sharded = from_hf(tmp_path, mesh=mesh)
    expected = param_shardings(cfg2, mesh)
    for (path, x), want in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(expected)):
        assert x.sharding.is_equivalent_to(want, x.ndim), (jax.tree_util.keystr(path), x.sharding, want)
    assert len(sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set) == 8
    assert sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == jax.P(None, "fsdp", "tensor")
    _assert_trees_bitwise_equal(sharded, params)
    tokens = _tokens()
    logits = jax.jit(lambda p, t: Transformer(cfg2).apply({"params": p}, t))(sharded, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), _logits(cfg, params, tokens), atol=1e-5, rtol=0)


def test_from_hf_without_mesh_puts_everything_on_one_device(tmp_path):
    cfg = tiny("llama")
    to_hf(cfg, _random_params(cfg), tmp_path)
    _, params = from_hf(tmp_path)
    for x in jax.tree.leaves(params):
        assert x.sharding.device_set == {jax.local_devices()[0]}


# ---------------------------------------------------------------------------- errors
def _write_tiny(tmp_path, family="llama", **kw):
    cfg = tiny(family, **kw)
    to_hf(cfg, _random_params(cfg), tmp_path)
    return cfg


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    _write_tiny(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as err:
        from_hf(tmp_path)
    assert "MistralForCausalLM" in str(err.value)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(err.value)


def test_missing_tensor_is_named_with_the_files_searched(tmp_path):
    _write_tiny(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(HFCheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as err:
        from_hf(tmp_path)
    assert "model.safetensors" in str(err.value) and "missing" in str(err.value)
    assert err.value.tensor == "model.layers.1.mlp.up_proj.weight"


def test_unexpected_tensor_is_named(tmp_path):
    _write_tiny(tmp_path)  # llama: no attention biases

    def add(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    _rewrite_weights(tmp_path, add)
    with pytest.raises(HFCheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        from_hf(tmp_path)


def test_wrong_shape_names_tensor_expected_and_got(tmp_path):
    _write_tiny(tmp_path, "qwen3")

    def reshape(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((48, 64), np.float32)
    _rewrite_weights(tmp_path, reshape)
    with pytest.raises(HFCheckpointError) as err:
        from_hf(tmp_path)
    msg = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg
    assert "[48, 64]" in msg and "[32, 64]" in msg


def test_missing_weights_file_and_config_are_reported(tmp_path):
    with pytest.raises(HFCheckpointError, match="config.json"):
        from_hf(tmp_path)
    _write_tiny(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(HFCheckpointError, match="model.safetensors"):
        from_hf(tmp_path)


def test_tied_model_ignores_lm_head_and_names_without_model_prefix_load(tmp_path):
    cfg = tiny("qwen2", tie_embeddings=True)
    params = _random_params(cfg)
    to_hf(cfg, params, tmp_path)

    def edit(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
        for name in [n for n in t if n.startswith("model.")]:
            t[name[len("model."):]] = t.pop(name)  # the bare-model naming
    _rewrite_weights(tmp_path, edit)
    _, params2 = from_hf(tmp_path)
    _assert_trees_bitwise_equal(params2, params)


def test_to_hf_rejects_params_of_another_config(tmp_path):
    params = _random_params(tiny("llama"))
    with pytest.raises(ValueError, match="q_proj/bias"):
        to_hf(tiny("qwen2"), params, tmp_path)


def test_truncated_safetensors_file_names_the_file_and_the_first_cut_tensor(tmp_path):
    _write_tiny(tmp_path)
    file = tmp_path / "model.safetensors"
    infos = sorted(hf_lib._read_header(str(file)), key=lambda i: i.end)
    cut = infos[len(infos) // 2]  # cut the file inside this tensor's bytes
    with open(file, "r+b") as f:
        f.truncate(cut.begin + (cut.end - cut.begin) // 2)
    with pytest.raises(HFCheckpointError, match="truncated") as err:
        from_hf(tmp_path)
    assert str(file) in str(err.value) and repr(cut.name) in str(err.value)
    assert err.value.tensor == cut.name


def test_safetensors_header_whose_offsets_disagree_with_the_shape_names_the_tensor(tmp_path):
    _write_tiny(tmp_path)
    file = tmp_path / "model.safetensors"
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["shape"] = [7]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    file.write_bytes(raw[:8] + text + raw[8 + n:])
    with pytest.raises(HFCheckpointError, match=r"'model\.norm\.weight' in .*needs 28 bytes"):
        from_hf(tmp_path)


def test_invalid_config_json_names_its_path_and_position(tmp_path):
    _write_tiny(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(config.read_text()[:-10])  # cut off, as by an interrupted copy
    with pytest.raises(HFCheckpointError, match=r"config\.json is not valid JSON .*line") as err:
        from_hf(tmp_path)
    assert str(config) in str(err.value)
    config.write_text("[1, 2]")
    with pytest.raises(HFCheckpointError, match=r"holds a JSON list; expected an object"):
        from_hf(tmp_path)


def test_config_json_without_a_required_field_names_the_path_and_the_field(tmp_path):
    _write_tiny(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"config\.json: required field "
                                                    r"'hidden_size' is missing"):
        from_hf(tmp_path)


def test_invalid_shard_index_names_its_path(tmp_path):
    _write_tiny(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(HFCheckpointError, match=r"model\.safetensors\.index\.json: "
                                                r"model\.safetensors\.index\.json is not valid"):
        from_hf(tmp_path)
