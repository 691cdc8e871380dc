"""jaxpost/analysis/intruders.py: intruder dimensions (ALGORITHMS.md §5.1)."""

import chex
import numpy as np

from jaxpost.analysis.intruders import intruder_dimensions, max_cosines


class MaxCosinesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_sanity_example_of_algorithms_md(self):
        """W0 = diag(2, 1, 0.5), W = W0 + 3 v v^T with v = (1,1,1)/sqrt(3)."""
        w0 = np.diag([2.0, 1.0, 0.5])
        v = np.ones(3) / np.sqrt(3)
        w = w0 + 3 * np.outer(v, v)
        cos, sigma = self.variant(max_cosines, static_argnames=("k", "side"))(w0, w, k=3)
        chex.assert_shape(cos, (3,))
        np.testing.assert_allclose(sigma, [4.303, 1.5, 0.697], atol=1e-3)
        np.testing.assert_allclose(cos, [0.735, 0.667, 0.831], atol=1e-3)


def test_sanity_example_counts_two_intruders_at_0_75():
    w0 = np.diag([2.0, 1.0, 0.5])
    v = np.ones(3) / np.sqrt(3)
    res = intruder_dimensions(w0, w0 + 3 * np.outer(v, v), k=3, epsilons=(0.5, 0.75))
    assert res.counts == (0, 2)
    s2 = np.array([4.303, 1.5, 0.697]) ** 2
    np.testing.assert_allclose(res.energy_share[1], (s2[0] + s2[1]) / s2.sum(), atol=1e-3)


def test_planted_direction_is_an_intruder_and_a_rescaling_has_none():
    rng = np.random.default_rng(0)
    d = 32
    w0 = np.diag(np.linspace(2.0, 0.5, d)) @ np.linalg.qr(rng.normal(size=(d, d)))[0]
    u = np.ones(d) / np.sqrt(d)  # |cos| 1/sqrt(32) ~ 0.18 with each base left vector
    v = rng.normal(size=d)
    v /= np.linalg.norm(v)
    planted = intruder_dimensions(w0, w0 + 10.0 * np.outer(u, v), k=10, epsilons=(0.5,))
    assert planted.counts == (1,)
    assert planted.max_cos[0] < 0.5 and np.all(planted.max_cos[1:] >= 0.5)
    assert planted.energy_share[0] > 0.5
    rescaled = intruder_dimensions(w0, 1.7 * w0, k=10, epsilons=(0.5, 0.9))
    assert rescaled.counts == (0, 0)
    np.testing.assert_allclose(rescaled.max_cos, 1.0, atol=1e-4)


def test_right_side_and_rectangular_gqa_shaped_matrices():
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(16, 64))  # a k_proj of 2 kv heads x 8: [out, in]
    same = intruder_dimensions(w0, 2.0 * w0, k=10, side="right")
    assert same.counts == (0,) and same.max_cos.shape == (10,)
    x = rng.normal(size=64)
    x -= w0.T @ np.linalg.lstsq(w0.T, x, rcond=None)[0]  # outside the base's row space
    x /= np.linalg.norm(x)
    right = intruder_dimensions(w0, w0 + 50.0 * np.outer(rng.normal(size=16), x), k=3,
                                side="right")
    assert right.counts[0] >= 1 and right.max_cos[0] < 0.1
