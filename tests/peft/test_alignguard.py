"""AlignGuard terms against hand-computed values (ALGORITHMS.md §1.4's degenerate example
and a non-degenerate one in the default two-adapter split), their gradients, and the
configuration warnings."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.peft import alignguard as AG
from jaxpost.peft.fisher import Fisher

KEY = "layers/self_attn/q_proj/kernel"


def _params(a_row, t_row):
    """One kernel [in=1, out=4], rank 1, A = 1, s = 1: ΔW_A = a_row, ΔW_T = t_row."""
    node = {"kernel": jnp.zeros((1, 4)), "lora_a": jnp.ones((1, 1)),
            "lora_b": jnp.asarray([t_row], jnp.float32),
            "lora_a_align": jnp.ones((1, 1)), "lora_b_align": jnp.asarray([a_row], jnp.float32)}
    return {"layers": {"self_attn": {"q_proj": node}}}


def _diag_fisher(f):
    return Fisher("diagonal", {"layers": {"self_attn": {"q_proj": {
        "kernel": jnp.asarray([f], jnp.float32)}}}}, 1, {})


class AlignGuardTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_algorithms_1_4_example_projection_split(self):
        # δ = (1, 2, 0, 0), P_A = the projector onto e1 (top-1 of F = diag(10, 0, 0, 0)),
        # h = 1: fisher 10·1² = 10, stability 2² = 4, E_rm = E_geo = 0 (orthogonal split).
        cfg = AG.AlignGuardConfig(enabled=True, split="projection", stability="ones",
                                  top_frac=0.25)
        stats = AG.fisher_stats(_diag_fisher([10.0, 0, 0, 0]), cfg)
        np.testing.assert_array_equal(stats[KEY]["mask"], [[1, 0, 0, 0]])
        params = {"layers": {"self_attn": {"q_proj": {
            "kernel": jnp.zeros((1, 4)), "lora_a": jnp.ones((1, 1)),
            "lora_b": jnp.asarray([[1.0, 2.0, 0, 0]])}}}}
        reg = AG.alignguard_regulariser(cfg, stats, lora_scale=1.0)
        value, m = self.variant(lambda p, s: reg.fn(p, {}, s))(params, reg.stats)
        np.testing.assert_allclose(float(m["agl_fisher"]), 0.25 * 10, rtol=1e-6)
        np.testing.assert_allclose(float(m["agl_stability"]), 0.5 * 4, rtol=1e-6)
        assert float(m["agl_overlap"]) == 0.0 and float(m["agl_geodesic"]) == 0.0
        np.testing.assert_allclose(float(value), 4.5, rtol=1e-6)
        warnings = AG.config_warnings(cfg, "diagonal")
        assert any("agl_overlap" in w for w in warnings)
        assert any("agl_geodesic" in w for w in warnings)

    @chex.variants(with_jit=True, without_jit=True)
    def test_default_two_adapter_split_hand_computed(self):
        # a = ΔW_A = (1, 2, 0, 0), t = ΔW_T = (1, 0, 3, 0), F = h = diag(10, 1, 0, 2):
        # fisher = 10·1 + 1·4 = 14; stability = 10·1 + 0·9 = 10;
        # E_rm = mean_j η_j|a_j t_j| = (1 + 4·σ(2 − 0.01))·1 / 4; E_geo = 1² / (5·10).
        cfg = AG.AlignGuardConfig(enabled=True)
        assert AG.uses_align_adapter(cfg) and AG.config_warnings(cfg, "diagonal") == []
        stats = AG.fisher_stats(_diag_fisher([10.0, 1.0, 0.0, 2.0]), cfg)
        reg = AG.alignguard_regulariser(cfg, stats, lora_scale=1.0)
        value, m = self.variant(lambda p, s: reg.fn(p, {}, s))(
            _params([1.0, 2.0, 0, 0], [1.0, 0, 3.0, 0]), reg.stats)
        e_rm = (1 + 4 / (1 + math.exp(-1.99))) / 4
        want = {"agl_fisher": 0.25 * 14, "agl_stability": 0.5 * 10,
                "agl_overlap": 0.1 * 0.5 * e_rm, "agl_geodesic": 0.1 * 0.5 * 1 / 50}
        for k, v in want.items():
            np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, err_msg=k)
        np.testing.assert_allclose(float(value), sum(want.values()), rtol=1e-5)

    def test_every_term_has_a_gradient_and_all_lambdas_zero_has_none(self):
        cfg = AG.AlignGuardConfig(enabled=True)
        stats = AG.fisher_stats(_diag_fisher([10.0, 1.0, 0.5, 2.0]), cfg)
        reg = AG.alignguard_regulariser(cfg, stats, lora_scale=1.0)
        params = _params([1.0, 2.0, 0.5, 0], [1.0, -0.5, 3.0, 0.2])
        for name in AG.METRICS.values():
            g = jax.grad(lambda p, n=name: reg(p, {})[1][n])(params)
            norm = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g))))
            assert norm > 1e-6, name
        off = dataclasses.replace(cfg, lambda_a=0.0, lambda_t=0.0, lambda_nc=0.0)
        assert not off.active and not AG.uses_align_adapter(off)
        assert "plain LoRA" in AG.config_warnings(off, "diagonal")[0]
        reg0 = AG.alignguard_regulariser(off, stats, lora_scale=1.0)
        value, grads = jax.value_and_grad(lambda p: reg0(p, {})[0])(params)
        assert float(value) == 0.0
        chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, params))

    def test_at_initialisation_every_term_is_zero(self):
        cfg = AG.AlignGuardConfig(enabled=True)
        stats = AG.fisher_stats(_diag_fisher([10.0, 1.0, 0.5, 2.0]), cfg)
        _, m = AG.alignguard_regulariser(cfg, stats, 1.0)(_params([0.0] * 4, [0.0] * 4), {})
        chex.assert_tree_all_finite(m)
        assert all(float(v) == 0.0 for v in m.values())

    def test_kfac_fisher_term_equals_the_explicit_low_rank_kronecker_quadratic(self):
        rng = np.random.default_rng(0)
        m_in, m_out = rng.normal(size=(3, 3)), rng.normal(size=(4, 4))
        s_in, s_out = m_in @ m_in.T, m_out @ m_out.T
        lam_in, u_in = np.linalg.eigh(s_in)
        lam_out, u_out = np.linalg.eigh(s_out)
        node = {"s_in": s_in, "s_out": s_out, "u_in": u_in[:, ::-1][:, :2],
                "lam_in": lam_in[::-1][:2], "u_out": u_out[:, ::-1][:, :3],
                "lam_out": lam_out[::-1][:3]}
        fisher = Fisher("kfac", {"lm_head": {"kernel": jax.tree.map(
            lambda x: jnp.asarray(np.ascontiguousarray(x), jnp.float32), node)}}, 1, {})
        cfg = AG.AlignGuardConfig(enabled=True, split="projection")
        stats = AG.fisher_stats(fisher, cfg)["lm_head/kernel"]
        delta = rng.normal(size=(3, 4))
        # F_k = Σ_ij λ_i μ_j (u_i ⊗ v_j)(u_i ⊗ v_j)ᵀ over vec(ΔW) (row-major [in, out]).
        f = sum(node["lam_in"][i] * node["lam_out"][j]
                * np.outer(np.kron(node["u_in"][:, i], node["u_out"][:, j]),
                           np.kron(node["u_in"][:, i], node["u_out"][:, j]))
                for i in range(2) for j in range(3))
        got = AG.alignguard_terms({"lm_head/kernel": jnp.asarray(delta, jnp.float32)}, {},
                                  {"lm_head/kernel": stats}, cfg)["fisher"]
        np.testing.assert_allclose(float(got), delta.ravel() @ f @ delta.ravel(), rtol=1e-4)
        p = AG.project(jnp.asarray(delta, jnp.float32), stats)
        want = node["u_in"] @ node["u_in"].T @ delta @ node["u_out"] @ node["u_out"].T
        np.testing.assert_allclose(p, want, rtol=1e-4, atol=1e-5)

