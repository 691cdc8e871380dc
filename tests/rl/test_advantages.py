"""The advantage-estimator registry and RLOO against a NumPy reference (TRL 1.16's RLOO)."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.rl import advantages as A
from jaxpost.rl.grpo import group_advantages


def np_rloo(rewards, g, scale, eps=1e-4):
    """TRL 1.16 RLOOTrainer: nan-aware leave-one-out baseline, optional batch normalisation."""
    r = np.asarray(rewards, np.float64).reshape(-1, g)
    k = (~np.isnan(r)).sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        base = (np.nansum(r, 1, keepdims=True) - r) / (k - 1)
        adv = (r - base).reshape(-1)
        if scale == "batch":
            adv = (adv - np.nanmean(adv)) / (np.nanstd(adv, ddof=1) + eps)
        if scale == "group":
            std = np.array([np.nanstd(row, ddof=1) if np.sum(~np.isnan(row)) > 1 else 0.0
                            for row in r])
            adv = (adv.reshape(-1, g) / (std[:, None] + eps)).reshape(-1)
    return np.nan_to_num(adv, nan=0.0)


class RlooTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy(self):
        rewards = np.array([1.0, 0.0, 0.5, 2.0, np.nan, 3.0, 1.0, 1.0, 4.0, np.nan, np.nan,
                            np.nan], np.float32)
        fn = self.variant(A.rloo_advantages, static_argnames=("group_size", "scale_rewards"))
        for scale in ("none", "batch", "group"):
            adv, stats = fn(jnp.asarray(rewards), group_size=4, scale_rewards=scale)
            chex.assert_shape(adv, (12,))
            chex.assert_tree_all_finite(adv)
            chex.assert_trees_all_close(adv, np_rloo(rewards, 4, scale).astype(np.float32),
                                        atol=1e-5)
        assert float(stats["frac_reward_none"]) == pytest.approx(4 / 12)

    def test_hand_numbers(self):
        # Group (1, 0, 0.5, 2): baselines (2.5/3, 3.5/3, 3/3, 1.5/3).
        adv, _ = A.rloo_advantages(jnp.array([1.0, 0.0, 0.5, 2.0]), 4)
        chex.assert_trees_all_close(adv, jnp.array([1 / 6, -7 / 6, -0.5, 1.5]), atol=1e-6)
        # RLOO = G / (G - 1) x the unscaled group-relative advantage.
        grpo, _ = group_advantages(jnp.array([1.0, 0.0, 0.5, 2.0]), 4, "none")
        chex.assert_trees_all_close(adv, grpo * 4 / 3, atol=1e-6)


class RegistryTest(chex.TestCase):

    def test_names_and_dispatch(self):
        assert {"grpo", "rloo", "gae"} <= set(A.ADVANTAGE_ESTIMATORS)
        r = jnp.array([1.0, 0.0, 0.5, 2.0])
        m = jnp.ones((4, 3))
        got, _ = A.estimate_advantages("grpo", r, m, group_size=4, scale_rewards="group")
        want, _ = group_advantages(r, 4, "group")
        chex.assert_trees_all_close(got, want)
        with pytest.raises(ValueError, match="unknown advantage_estimator 'ppo'"):
            A.estimate_advantages("ppo", r, m, group_size=4)
        with pytest.raises(ValueError, match="needs a critic"):
            A.estimate_advantages("gae", r, m, group_size=4)
        with pytest.raises(ValueError, match="already registered"):
            A.register_advantage_estimator("rloo")(lambda *a, **k: None)

    def test_gae_entry_whitened(self):
        m = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
        adv, stats = A.estimate_advantages("gae", jnp.array([1.0, -1.0]), m, group_size=1,
                                           values=jnp.zeros((2, 3)), gamma=1.0, lam=1.0)
        chex.assert_shape((adv, stats["returns"]), (2, 3))
        # Reward-to-go of the terminal rewards: (1, 1, 1) and (-1, -1), then whitened.
        chex.assert_trees_all_close(stats["returns"], jnp.array([[1, 1, 1], [-1, -1, 0.0]]))
        valid = np.asarray(adv)[np.asarray(m) > 0]
        assert abs(valid.mean()) < 1e-6 and valid.std(ddof=1) == pytest.approx(1.0, rel=1e-4)
