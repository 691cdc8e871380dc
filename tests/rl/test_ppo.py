"""PPO maths (jaxpost.rl.ppo) against NumPy references and hand computations."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.rl import ppo


def np_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE per row over its valid tokens only (left-aligned rows)."""
    n, t = rewards.shape
    adv = np.zeros((n, t))
    for i in range(n):
        idx = np.flatnonzero(mask[i])
        a_next, v_next = 0.0, 0.0
        for j in idx[::-1]:
            delta = rewards[i, j] + gamma * v_next - values[i, j]
            a_next = delta + gamma * lam * a_next
            v_next = values[i, j]
            adv[i, j] = a_next
    return adv, (adv + values) * mask


RAGGED = np.array([[1, 1, 1, 1, 1, 1],
                   [1, 1, 1, 0, 0, 0],
                   [1, 0, 0, 0, 0, 0],
                   [0, 0, 0, 0, 0, 0]], np.float32)


class GaeTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_ragged(self):
        rng = np.random.default_rng(0)
        r = rng.normal(size=RAGGED.shape).astype(np.float32)
        v = rng.normal(size=RAGGED.shape).astype(np.float32)
        gae = self.variant(ppo.gae, static_argnames=("gamma", "lam"))
        for gamma, lam in ((1.0, 0.95), (0.9, 1.0)):
            adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(RAGGED), gamma=gamma,
                           lam=lam)
            want_adv, want_ret = np_gae(r * RAGGED, v * RAGGED, RAGGED, gamma, lam)
            chex.assert_shape((adv, ret), RAGGED.shape)
            chex.assert_trees_all_close(adv, want_adv.astype(np.float32), atol=1e-5)
            chex.assert_trees_all_close(ret, want_ret.astype(np.float32), atol=1e-5)
            # Padding gets 0 in both, whatever garbage sits under it.
            np.testing.assert_array_equal(np.asarray(adv)[RAGGED == 0], 0.0)
            np.testing.assert_array_equal(np.asarray(ret)[RAGGED == 0], 0.0)

    def test_gamma_lam_one_zero_values_is_reward_to_go(self):
        r = np.array([[1.0, 2.0, 3.0, 9.0], [0.5, -1.0, 7.0, 7.0]], np.float32)
        m = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
        adv, ret = ppo.gae(r, np.zeros_like(r), m, gamma=1.0, lam=1.0)
        want = np.array([[6.0, 5.0, 3.0, 0.0], [-0.5, -1.0, 0.0, 0.0]], np.float32)
        chex.assert_trees_all_close(adv, want)
        chex.assert_trees_all_close(ret, want)

    def test_hand_computed_one_row(self):
        # r = (0, 1), V = (0.5, 0.25), gamma = 0.9, lam = 0.8:
        # delta_1 = 1 - 0.25 = 0.75; delta_0 = 0 + 0.9 * 0.25 - 0.5 = -0.275
        # A_1 = 0.75; A_0 = -0.275 + 0.72 * 0.75 = 0.265
        adv, ret = ppo.gae(jnp.array([[0.0, 1.0]]), jnp.array([[0.5, 0.25]]),
                           jnp.ones((1, 2)), gamma=0.9, lam=0.8)
        chex.assert_trees_all_close(adv, jnp.array([[0.265, 0.75]]), atol=1e-6)
        chex.assert_trees_all_close(ret, jnp.array([[0.765, 1.0]]), atol=1e-6)

    def test_hole_in_a_row_is_skipped(self):
        # A masked position inside a row is passed over: same as deleting it.
        r = np.array([[1.0, 5.0, 2.0, 3.0]], np.float32)
        v = np.array([[0.1, 9.0, 0.2, 0.3]], np.float32)
        m = np.array([[1, 0, 1, 1]], np.float32)
        adv, _ = ppo.gae(r, v, m, gamma=0.9, lam=0.95)
        dense, _ = ppo.gae(r[:, [0, 2, 3]], v[:, [0, 2, 3]], np.ones((1, 3)), gamma=0.9,
                           lam=0.95)
        chex.assert_trees_all_close(np.asarray(adv)[:, [0, 2, 3]], dense)
        assert float(adv[0, 1]) == 0.0


class RewardsAndKlTest(chex.TestCase):

    def test_kl_estimators(self):
        logp = np.log(np.array([[0.5, 0.2, 0.9]], np.float32))
        ref = np.log(np.array([[0.25, 0.4, 0.1]], np.float32))
        m = np.array([[1, 1, 0]], np.float32)
        k1 = ppo.kl_per_token(logp, ref, m, "k1")
        x = ref - logp
        chex.assert_trees_all_close(k1, np.where(m > 0, logp - ref, 0), atol=1e-6)
        k3 = ppo.kl_per_token(logp, ref, m, "k3")
        chex.assert_trees_all_close(k3, np.where(m > 0, np.exp(x) - x - 1, 0), atol=1e-6)
        assert np.all(np.asarray(k3) >= 0)
        with pytest.raises(ValueError, match="kl_estimator"):
            ppo.kl_per_token(logp, ref, m, "k2")

    def test_terminal_score_minus_kl(self):
        m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
        kl = np.full(m.shape, 0.5, np.float32)
        r = ppo.token_rewards(kl, m, 0.1, scores=np.array([2.0, -1.0, 7.0], np.float32))
        want = np.array([[-0.05, -0.05, 1.95, 0], [-1.05, 0, 0, 0], [0, 0, 0, 0]], np.float32)
        chex.assert_trees_all_close(r, want, atol=1e-6)

    def test_distributed_score(self):
        m = np.array([[1, 1, 0]], np.float32)
        dist = np.array([[0.7, 0.3, 5.0]], np.float32)
        kl = np.array([[0.1, -0.2, 3.0]], np.float32)
        r = ppo.token_rewards(kl, m, 0.5, score_tokens=dist)
        chex.assert_trees_all_close(r, np.array([[0.65, 0.4, 0.0]], np.float32), atol=1e-6)
        with pytest.raises(ValueError, match="exactly one"):
            ppo.token_rewards(kl, m, 0.5)


class WhitenValueLossTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_whiten_ignores_padding(self):
        x = np.array([[1.0, 2.0, 1e6], [3.0, 1e6, -1e6]], np.float32)
        m = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
        out = self.variant(ppo.whiten)(x, m)
        valid = np.array([1.0, 2.0, 3.0])
        want = (valid - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8)
        chex.assert_trees_all_close(np.asarray(out)[m > 0], want.astype(np.float32), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(out)[m == 0], 0.0)
        kept = ppo.whiten(x, m, shift_mean=False)
        chex.assert_trees_all_close(np.asarray(kept)[m > 0], (want + 2.0).astype(np.float32),
                                    atol=1e-6)

    def test_clipped_value_loss_by_hand(self):
        # c = 0.2. Token 1: V=1.0, old=0.5, R=2.0 -> V_clip=0.7: max(1.0, 1.69)=1.69 (clipped).
        # Token 2: V=0.4, old=0.5, R=0.0 -> V_clip=0.4 (inside): both 0.16.
        # Token 3: V=0.0, old=1.0, R=0.0 -> V_clip=0.8: max(0, 0.64)=0.64 (clipped).
        # Token 4 is padding.  Sum = 0.5 * (1.69 + 0.16 + 0.64) = 1.245, count 3.
        v = np.array([[1.0, 0.4, 0.0, 9.0]], np.float32)
        old = np.array([[0.5, 0.5, 1.0, 0.0]], np.float32)
        ret = np.array([[2.0, 0.0, 0.0, 9.0]], np.float32)
        m = np.array([[1, 1, 1, 0]], np.float32)
        s, c, aux = ppo.value_loss(v, old, ret, m, clip_range_value=0.2)
        chex.assert_trees_all_close((s, c), (np.float32(1.245), np.float32(3.0)), atol=1e-6)
        chex.assert_trees_all_close(aux["value_clipfrac"], (np.float32(2.0), np.float32(3.0)))

    def test_explained_variance(self):
        ret = np.array([[1.0, 2.0, 3.0, 0.0]], np.float32)
        m = np.array([[1, 1, 1, 0]], np.float32)
        assert float(ppo.explained_variance(ret, ret, m)) == pytest.approx(1.0)
        assert float(ppo.explained_variance(np.full_like(ret, 2.0), ret, m)) == pytest.approx(0.0)

    def test_adaptive_kl(self):
        # KL twice the target: error clipped to 0.2; beta * (1 + 0.2 * 64 / 1000).
        assert float(ppo.adaptive_kl_coef(0.1, 12.0, 64, 6.0, 1000.0)) == pytest.approx(
            0.1 * (1 + 0.2 * 0.064))
        # Slightly below target: e = 5.7 / 6 - 1 = -0.05.
        assert float(ppo.adaptive_kl_coef(0.1, 5.7, 64, 6.0, 1000.0)) == pytest.approx(
            0.1 * (1 - 0.05 * 0.064))
        with pytest.raises(ValueError, match="target"):
            ppo.adaptive_kl_coef(0.1, 1.0, 1, 0.0, 10.0)
