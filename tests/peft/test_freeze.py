"""Freeze rules and presets select exactly the tensors they name (by Hugging Face name)."""

import re

import chex
import jax
import numpy as np
import pytest

from jaxpost.models import param_shapes, tiny
from jaxpost.models.hf import leaf_hf_names
from jaxpost.peft import freeze as F
from jaxpost.peft import partition as P

CFG = tiny("qwen2", num_layers=4)  # q/k/v biases: presets must treat them with their matrix
SHAPES = param_shapes(CFG)


def trained_names(mask) -> set[str]:
    """HF names (per layer) that train under `mask`."""
    names = leaf_hf_names(SHAPES)
    flat_mask = dict(zip(names, jax.tree.leaves(mask, is_leaf=lambda x: isinstance(
        x, (bool, np.bool_, np.ndarray)))))
    out = set()
    for path, ns in names.items():
        m = flat_mask[path]
        per_layer = np.broadcast_to(np.asarray(m), (len(ns),))
        out.update(n for n, t in zip(ns, per_layer) if t)
    return out


ALL = {n for ns in leaf_hf_names(SHAPES).values() for n in ns}


def mask_of(**kw):
    return F.trainable_mask(SHAPES, F.make_rules(num_layers=4, **kw))


def test_no_rules_train_everything():
    assert trained_names(mask_of()) == ALL


def test_mid_mlp_freezes_exactly_the_mlps_of_the_half_open_layer_range():
    frozen = ALL - trained_names(mask_of(preset="mid_mlp(1,3)"))
    expected = {f"model.layers.{i}.mlp.{m}.weight" for i in (1, 2)
                for m in ("gate_proj", "up_proj", "down_proj")}
    assert frozen == expected


def test_qk_only_trains_q_and_k_with_their_biases_only():
    trained = trained_names(mask_of(preset="qk_only"))
    assert trained == {n for n in ALL if re.search(r"\.self_attn\.(q|k)_proj\.", n)}
    assert "model.layers.3.self_attn.q_proj.bias" in trained


def test_attention_only_and_mlp_only_train_their_block_only():
    assert trained_names(mask_of(preset="attention_only")) == {n for n in ALL if ".self_attn." in n}
    assert trained_names(mask_of(preset="mlp_only")) == {n for n in ALL if ".mlp." in n}


def test_hft_freezes_half_of_each_category_deterministically_in_the_seed():
    trained = trained_names(mask_of(preset="hft(3)"))
    assert trained == trained_names(mask_of(preset="hft(3)"))
    assert trained != trained_names(mask_of(preset="hft(4)"))
    assert "model.embed_tokens.weight" not in trained and "lm_head.weight" not in trained
    ffn_frozen_per_layer = []
    for i in range(4):
        attn = {m for m in ("q_proj", "k_proj", "v_proj", "o_proj")
                if f"model.layers.{i}.self_attn.{m}.weight" in trained}
        assert len(attn) == 2, (i, attn)
        ffn = {m for m in ("gate_proj", "up_proj", "down_proj")
               if f"model.layers.{i}.mlp.{m}.weight" in trained}
        ffn_frozen_per_layer.append(3 - len(ffn))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert f"model.layers.{i}.{norm}.weight" in trained
        for m in ("q_proj", "k_proj", "v_proj"):  # a bias follows its matrix
            w, b = (f"model.layers.{i}.self_attn.{m}.{x}" for x in ("weight", "bias"))
            assert (w in trained) == (b in trained)
    assert sorted(ffn_frozen_per_layer) == [1, 1, 2, 2]  # half the layers 2 of 3, else 1


def test_trainable_and_freeze_combine_freeze_wins():
    trained = trained_names(mask_of(trainable=("q_proj", "k_proj"), freeze=(r"layers\.0\.",)))
    assert trained == {n for n in ALL if re.search(r"(q|k)_proj", n) and ".layers.0." not in n}


def test_a_stacked_leaf_frozen_in_some_layers_gets_a_per_layer_mask():
    mask = mask_of(freeze=(r"layers\.(0|2)\.mlp\.down_proj",))
    leaf = mask["layers"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(leaf, [False, True, False, True])
    assert mask["layers"]["mlp"]["up_proj"]["kernel"] is True


@pytest.mark.parametrize("kw,match", [
    (dict(freeze=("mlp.dwn_proj",)), r"freeze rule 'mlp\.dwn_proj' matches no tensor.*"
                                     r"model\.layers\.0\.mlp\.down_proj\.weight"),
    (dict(trainable=("qproj",)), r"trainable rule 'qproj' matches no tensor"),
    (dict(preset="mid_mlp(2,9)"), r"mid_mlp\(2,9\) needs 0 <= a < b <= 4"),
    (dict(preset="qk"), r"unknown preset 'qk'"),
    (dict(preset="hft"), r"hft takes 1 integer"),
    (dict(freeze=("(",)), r"freeze pattern '\(' is not a regular expression"),
    (dict(freeze="q_proj"), r"must be a tuple of patterns"),
])
def test_bad_rules_stop_with_the_rule_named(kw, match):
    with pytest.raises(F.FreezeRuleError, match=match):
        mask_of(**kw)


def test_counts_split_partially_frozen_leaves_by_layer():
    mask = mask_of(freeze=(r"layers\.(0|2)\.mlp\.down_proj",))
    counts = P.count_params(SHAPES, mask)
    down = int(np.prod(SHAPES["layers"]["mlp"]["down_proj"]["kernel"].shape))
    assert counts.frozen == down // 2
    assert counts.total == CFG.num_params


def test_split_then_combine_is_the_identity_and_halves_are_disjoint():
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), SHAPES)
    mask = mask_of(preset="qk_only")
    trainable, frozen = P.split(params, mask)
    chex.assert_trees_all_equal_structs(P.combine(frozen, trainable), params)
    n_t, n_f = len(jax.tree.leaves(trainable)), len(jax.tree.leaves(frozen))
    assert n_t == 4 and n_t + n_f == len(jax.tree.leaves(params))  # q,k kernels + biases
