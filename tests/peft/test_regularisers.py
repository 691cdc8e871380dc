"""Regularisers as pure functions: L2-to-start and EWC against NumPy, LoRA and full FT."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.peft import lora as L
from jaxpost.peft import regularisers as R


def _lora_params(rng):
    return {"layers": {"q_proj": {"kernel": rng.normal(size=(2, 4, 3)).astype(np.float32),
                                  "lora_a": rng.normal(size=(2, 4, 2)).astype(np.float32),
                                  "lora_b": rng.normal(size=(2, 2, 3)).astype(np.float32)}},
            "lm_head": {"kernel": rng.normal(size=(4, 5)).astype(np.float32)}}


class RegulariserTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_ewc_under_lora_equals_numpy_fisher_weighted_squares(self):
        rng = np.random.default_rng(0)
        params = _lora_params(rng)
        fisher = {"layers": {"q_proj": {"kernel": rng.random((2, 4, 3)).astype(np.float32)}}}
        trainable = {"layers": {"q_proj": {k: params["layers"]["q_proj"][k]
                                           for k in ("lora_a", "lora_b")}}}
        frozen = {"layers": {"q_proj": {"kernel": params["layers"]["q_proj"]["kernel"]}},
                  "lm_head": params["lm_head"]}
        reg = R.ewc(0.3, fisher, lora_scale=2.0)
        value, metrics = self.variant(lambda t, f, s: reg.fn(t, f, s))(trainable, frozen, reg.stats)
        a, b = params["layers"]["q_proj"]["lora_a"], params["layers"]["q_proj"]["lora_b"]
        delta = 2.0 * np.einsum("lir,lro->lio", a.astype(np.float64), b)
        want = 0.3 * np.sum(fisher["layers"]["q_proj"]["kernel"] * delta ** 2)
        np.testing.assert_allclose(float(value), want, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["reg_ewc"]), want, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_l2_to_start_full_ft_value_and_gradient(self):
        rng = np.random.default_rng(1)
        w = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
             "b": {"c": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
        w0 = jax.tree.map(lambda x: x + 0.5, w)
        reg = R.l2_to_start(0.7, anchor=w0)
        value, grads = self.variant(jax.value_and_grad(
            lambda t, s: reg.fn(t, {}, s)[0]))(w, reg.stats)
        np.testing.assert_allclose(float(value), 0.7 * 0.25 * (6 + 4), rtol=1e-6)
        chex.assert_trees_all_close(grads, jax.tree.map(lambda x: jnp.full_like(x, -0.7), w),
                                    atol=1e-6)

    def test_two_adapter_pairs_sum_into_one_delta(self):
        rng = np.random.default_rng(2)
        node = _lora_params(rng)["layers"]["q_proj"]
        node["lora_a_align"] = rng.normal(size=(2, 4, 2)).astype(np.float32)
        node["lora_b_align"] = rng.normal(size=(2, 2, 3)).astype(np.float32)
        params = {"layers": {"q_proj": node}}
        assert L.adapter_suffixes(params) == ("", "_align")
        got = R.adapter_deltas(params, 0.5, L.adapter_suffixes(params))
        want = 0.5 * (np.einsum("lir,lro->lio", node["lora_a"], node["lora_b"])
                      + np.einsum("lir,lro->lio", node["lora_a_align"], node["lora_b_align"]))
        np.testing.assert_allclose(got["layers"]["q_proj"]["kernel"], want, rtol=1e-5)
        merged = L.merge_adapters(params, 0.5)["layers"]["q_proj"]["kernel"]
        np.testing.assert_allclose(merged, node["kernel"] + want, rtol=1e-5, atol=1e-6)

    def test_ewc_fisher_for_a_kernel_without_adapter_names_it(self):
        fisher = {"lm_head": {"kernel": np.ones((4, 5), np.float32)}}
        reg = R.ewc(1.0, fisher, lora_scale=1.0)
        params = _lora_params(np.random.default_rng(0))
        with pytest.raises(ValueError, match="lm_head/kernel"):
            reg(params, {})
