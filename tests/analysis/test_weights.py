"""jaxpost/analysis/weights.py: per-(layer, module) weight change."""

import math

import chex
import jax
import numpy as np
import pytest

from jaxpost.analysis.weights import (
    aggregate_rel,
    change_norms,
    iter_tensors,
    module_of,
    weight_change,
)
from jaxpost.models import tiny
from tests.analysis.analysis_testing import random_params


@pytest.fixture(scope="module")
def base():
    return random_params(tiny("qwen2"))


def _by_key(changes):
    return {(c.layer, c.module): c for c in changes}


class ChangeNormsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_change_norms_match_numpy(self):
        rng = np.random.default_rng(0)
        w0, w = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
        d, b = self.variant(change_norms)(w0, w)
        np.testing.assert_allclose([d, b], [np.linalg.norm(w - w0), np.linalg.norm(w0)],
                                   rtol=1e-6)
        d, b = self.variant(change_norms, static_argnames="axis")(w0, w, axis=1)
        chex.assert_shape(d, (5,))
        np.testing.assert_allclose(d, np.linalg.norm(w - w0, axis=1), rtol=1e-6)


def test_module_names_come_from_hf_names():
    assert module_of("model.layers.12.mlp.down_proj.weight") == (12, "down_proj")
    assert module_of("model.layers.0.self_attn.q_proj.bias") == (0, "q_proj.bias")
    assert module_of("model.embed_tokens.weight") == (None, "embed_tokens")
    assert module_of("lm_head.weight") == (None, "lm_head")


def test_identical_checkpoints_give_zero_change(base):
    changes = weight_change(base, jax.tree.map(np.copy, base))
    assert changes and all(c.abs == c.rel == c.rms == 0.0 for c in changes)


def test_scaled_weights_give_relative_change_0_01_in_every_tensor(base):
    changes = weight_change(base, jax.tree.map(lambda x: 1.01 * x, base))
    zero = {c.module for c in changes if c.base_norm == 0}
    assert zero == {"q_proj.bias", "k_proj.bias", "v_proj.bias"}  # zero-initialised
    for c in changes:
        expected = 0.0 if c.base_norm == 0 else 0.01
        np.testing.assert_allclose(c.rel, expected, rtol=1e-4, err_msg=f"{c.layer} {c.module}")
        np.testing.assert_allclose(c.rms, 0.01 * c.base_norm / math.sqrt(c.numel), rtol=1e-4)
    for module, rel in aggregate_rel(changes).items():
        np.testing.assert_allclose(rel, 0.0 if module in zero else 0.01, rtol=1e-4,
                                   err_msg=module)


def test_stacked_layers_are_split_and_gqa_kv_shapes_kept(base):
    cfg = tiny("qwen2")  # 4 query heads, 2 kv heads
    tuned = jax.tree.map(np.copy, base)
    k = tuned["layers"]["self_attn"]["k_proj"]["kernel"]
    delta = np.zeros_like(k)
    delta[1, 3, 5] = 0.5  # layer 1 only
    tuned["layers"]["self_attn"]["k_proj"]["kernel"] = k + delta
    changes = _by_key(weight_change(base, tuned))
    assert {layer for layer, _ in changes} == {None, *range(cfg.num_layers)}
    kv_numel = cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim
    assert changes[(1, "k_proj")].numel == kv_numel
    assert changes[(1, "q_proj")].numel == cfg.hidden_size * cfg.num_heads * cfg.head_dim
    assert changes[(1, "k_proj.bias")].numel == cfg.num_kv_heads * cfg.head_dim
    np.testing.assert_allclose(changes[(1, "k_proj")].abs, 0.5, rtol=1e-6)
    np.testing.assert_allclose(changes[(1, "k_proj")].rms, 0.5 / math.sqrt(kv_numel), rtol=1e-6)
    np.testing.assert_allclose(changes[(1, "k_proj")].rel,
                               0.5 / np.linalg.norm(k[1]), rtol=1e-5)
    moved = {key for key, c in changes.items() if c.abs > 0}
    assert moved == {(1, "k_proj")}


def test_hf_matrix_is_the_transposed_kernel(base):
    q = next(t for t in iter_tensors(base) if (t.layer, t.module) == (0, "q_proj"))
    chex.assert_trees_all_equal(q.hf_matrix(), base["layers"]["self_attn"]["q_proj"]["kernel"][0].T)


def test_adapters_and_mismatched_trees_are_refused(base):
    with_adapter = jax.tree.map(np.copy, base)
    with_adapter["layers"]["self_attn"]["q_proj"]["lora_a"] = np.zeros((2, 64, 4))
    with pytest.raises(ValueError, match="LoRA adapter"):
        weight_change(base, with_adapter)
    other = jax.tree.map(np.copy, base)
    del other["layers"]["self_attn"]["q_proj"]["bias"]
    with pytest.raises(ValueError, match="different tensors"):
        weight_change(base, other)
