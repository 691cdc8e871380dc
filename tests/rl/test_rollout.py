"""jaxpost/rl/rollout.py: rollout row layout and completion log-probs."""

import chex
import jax
import numpy as np
import pytest

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


def _group_rows(p=6, c=5, groups=3, g=4, seed=1):
    """`groups` prompts of different lengths, each repeated `g` times, with completions of
    different lengths (some shorter than `c`, so padding sits inside the groups)."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, 64, rng.integers(1, p + 1))) for _ in range(groups)]
    rows = [pr for pr in prompts for _ in range(g)]
    return build_rows(rows, rng.integers(1, 64, (groups * g, c)).astype(np.int32),
                      rng.integers(1, c + 1, groups * g), p, 0)


@pytest.mark.slow  # ~22 s: two models' forward + backward, shared and per row
def test_shared_prompt_logits_and_gradients_equal_the_per_row_forward():
    """group_size=G runs each group's prompt once (a KV cache repeated to its rows): the
    logits, the masked log-probs and their parameter gradients equal the plain pass."""
    cfg = tiny("llama", num_layers=2, vocab_size=64)
    p, c, g, temperature = 6, 5, 4, 0.8
    params = init_params(cfg, jax.random.key(3))
    rows = _group_rows(p, c, g=g)
    mask = rows["completion_mask"]

    def objective(prm, group_size):
        logp = completion_logprobs(cfg, prm, rows, p, c, temperature, group_size=group_size)
        return (logp * mask).sum(), logp

    def run(group_size):
        return jax.jit(jax.value_and_grad(lambda prm: objective(prm, group_size),
                                          has_aux=True))(params)
    (total_1, logp_1), grads_1 = run(1)
    (total_g, logp_g), grads_g = run(g)
    chex.assert_shape(logp_g, (12, c))
    np.testing.assert_allclose(logp_g * mask, logp_1 * mask, atol=2e-5)
    np.testing.assert_allclose(total_g, total_1, rtol=1e-5)
    chex.assert_trees_all_close(grads_g, grads_1, atol=2e-5, rtol=1e-4)
    chex.assert_tree_all_finite(grads_g)
    logits_1 = completion_logits(cfg, params, rows, p, c, temperature)
    logits_g = completion_logits(cfg, params, rows, p, c, temperature, group_size=g)
    np.testing.assert_allclose(np.asarray(logits_g)[mask > 0], np.asarray(logits_1)[mask > 0],
                               atol=2e-5)


def test_shared_prompt_logits_refuse_rows_that_are_not_whole_groups():
    rows = _group_rows(groups=3, g=4)
    params = init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match="not whole groups of group_size=5"):
        completion_logits(CFG, params, rows, 6, 5, 1.0, group_size=5)
