"""jaxpost/rl/rollout.py: rollout row layout and completion log-probs."""

import jax
import numpy as np

from jaxpost.models import Transformer, init_params, tiny
from jaxpost.rl.rollout import build_rows, completion_logits, completion_logprobs

CFG = tiny("llama", num_layers=1, vocab_size=64)


def test_build_rows_left_pads_prompts_and_right_pads_completions():
    rows = build_rows([[7, 8], [1, 2, 3, 4, 5, 6]], np.array([[9, 10, 11], [12, 13, 14]]),
                      np.array([2, 3]), p=4, pad_id=0)
    np.testing.assert_array_equal(rows["tokens"], [[0, 0, 7, 8, 9, 10, 0], [3, 4, 5, 6, 12, 13, 14]])
    np.testing.assert_array_equal(rows["segment_ids"], [[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(rows["positions"], [[0, 0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(rows["completion_mask"], [[1, 1, 0], [1, 1, 1]])


def _rows(p=5, c=4, n=6, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, 64, rng.integers(1, p + 1))) for _ in range(n)]
    return build_rows(prompts, rng.integers(1, 64, (n, c)).astype(np.int32),
                      rng.integers(1, c + 1, n), p, 0)


def test_completion_logprobs_are_log_softmax_of_scaled_logits_at_the_completion_tokens():
    p, c, temperature = 5, 4, 0.7
    params = init_params(CFG, jax.random.key(0))
    rows = _rows(p, c)
    full = np.asarray(Transformer(CFG).apply(
        {"params": params}, rows["tokens"], positions=rows["positions"],
        segment_ids=rows["segment_ids"]), np.float64) / temperature
    logp_all = full - np.log(np.exp(full).sum(-1, keepdims=True))
    # column t's logits predict token t + 1: the completion tokens sit at P .. P+C-1
    want = np.take_along_axis(logp_all[:, p - 1:p + c - 1], rows["tokens"][:, p:, None], -1)[..., 0]
    got = jax.jit(lambda prm: completion_logprobs(CFG, prm, rows, p, c, temperature))(params)
    assert got.shape == (len(rows["tokens"]), c)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    logp, logits = completion_logprobs(CFG, params, rows, p, c, temperature, return_logits=True)
    np.testing.assert_array_equal(logp, completion_logprobs(CFG, params, rows, p, c, temperature))
    np.testing.assert_array_equal(logits, completion_logits(CFG, params, rows, p, c, temperature))
    np.testing.assert_allclose(logits, full[:, p - 1:p + c - 1], rtol=1e-5, atol=1e-5)
