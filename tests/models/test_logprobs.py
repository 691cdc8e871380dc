"""jaxpost/models/logprobs.py: per-token log-probabilities."""

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
