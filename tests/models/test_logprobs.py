"""jaxpost/models/logprobs.py: per-token log-probabilities."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models import token_logprobs


def test_token_logprobs_matches_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
    targets = jnp.array([[0, 6, 3], [1, 1, 2]])
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logprobs(logits, targets), expected, atol=1e-6)


def test_token_logprobs_of_bfloat16_logits_are_float32_and_finite_at_large_scale():
    logits = (1e4 * jax.random.normal(jax.random.key(1), (1, 4, 5))).astype(jnp.bfloat16)
    logp = token_logprobs(logits, jnp.zeros((1, 4), jnp.int32))
    assert logp.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logp)))
    assert bool(jnp.all(logp <= 0))


class TokenLogprobsHitsTest(chex.TestCase):
    """`with_hits`: the argmax accuracy from the log-sum-exp's max, and gradients equal to
    those of `jax.nn.log_softmax` (the max is a stop-gradient shift)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_hits_are_argmax_matches_and_values_and_grads_match_log_softmax(self):
        logits = jax.random.normal(jax.random.key(2), (2, 5, 11))
        targets = jnp.argmax(logits, -1).at[0, 1].set(3).at[1, 4].set(0)
        fn = self.variant(lambda x: token_logprobs(x, targets, with_hits=True))
        logp, hits = fn(logits)
        chex.assert_shape((logp, hits), (2, 5))
        expected_hits = (np.argmax(np.asarray(logits), -1) == np.asarray(targets))
        np.testing.assert_array_equal(np.asarray(hits), expected_hits.astype(np.float32))
        assert float(hits.sum()) == 8.0  # two of the ten targets were moved off the argmax

        def reference(x):
            return jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(x), targets[..., None], -1))
        chex.assert_trees_all_close(logp.sum(), reference(logits), atol=1e-5)
        grads = jax.grad(lambda x: jnp.sum(token_logprobs(x, targets)))(logits)
        chex.assert_trees_all_close(grads, jax.grad(reference)(logits), atol=1e-6)
