"""GRPO maths against NumPy references and the sanity numbers of ALGORITHMS.md 4.5."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.rl import grpo
from jaxpost.train.step import accumulate_gradients


# ------------------------------------------------------------------ NumPy reference (TRL)
def np_advantages(rewards, g, scale, eps=1e-4):
    r = np.asarray(rewards, np.float64).reshape(-1, g)
    adv = np.zeros_like(r)
    flat = np.asarray(rewards, np.float64)
    fv = flat[~np.isnan(flat)]
    batch_std = fv.std(ddof=1) if fv.size >= 2 else 0.0
    for k, row in enumerate(r):
        ok = ~np.isnan(row)
        v = row[ok]
        if v.size == 0:
            continue
        std = v.std(ddof=1) if v.size >= 2 else 0.0
        a = v - v.mean()
        if scale == "group":
            a = a / (std + eps)
        elif scale == "batch":
            a = a / (batch_std + eps)
        adv[k, ok] = a
    return adv.reshape(-1)


def np_token_loss(logp, old, adv, eps_lo, eps_hi, beta=0.0, ref=None, delta=None):
    c1 = np.exp(logp - old)
    c2 = np.clip(c1, 1 - eps_lo, 1 + eps_hi)
    if delta is not None:
        c1 = np.minimum(c1, delta)
    a = adv[:, None] if adv.ndim == 1 else adv
    loss = -np.minimum(c1 * a, c2 * a)
    if beta:
        x = ref - logp
        loss = loss + beta * (np.exp(x) - x - 1)
    return loss


def np_aggregate(loss, mask, loss_type, lmax=None):
    lm = loss * mask
    if loss_type == "grpo":
        return np.mean(lm.sum(1) / np.maximum(mask.sum(1), 1))
    if loss_type == "bnpo":
        return lm.sum() / max(mask.sum(), 1)
    if loss_type == "dr_grpo":
        return lm.sum() / (loss.shape[0] * lmax)
    if loss_type == "dapo":
        return lm.sum() / max(mask.sum(), 1)
    raise ValueError(loss_type)


def _uneven_mask(n=8, t=6):
    """Rows of lengths t, t-1, ..., including an all-zero row (row 3)."""
    mask = np.zeros((n, t), np.float32)
    lengths = [6, 2, 5, 0, 1, 6, 3, 4][:n]
    for i, L in enumerate(lengths):
        mask[i, :L] = 1.0
    return mask


# ------------------------------------------------------------------------------ advantages
class TestGroupAdvantages(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_sanity_numbers_unbiased_std_plus_eps(self):
        fn = self.variant(functools.partial(grpo.group_advantages, group_size=4,
                                            scale_rewards="group"))
        adv, stats = fn(jnp.array([1.0, 0.0, 0.0, 1.0]))
        np.testing.assert_allclose(adv, [0.8659, -0.8659, -0.8659, 0.8659], atol=1e-4)
        np.testing.assert_allclose(adv[0], 0.5 / (np.sqrt(1 / 3) + 1e-4), rtol=1e-6)
        assert float(stats["frac_reward_zero_std"]) == 0.0
        np.testing.assert_allclose(stats["reward_mean"], 0.5)

    def test_scale_none_is_dr_grpo_plus_minus_half(self):
        adv, _ = grpo.group_advantages(jnp.array([1.0, 0.0, 0.0, 1.0]), 4, "none")
        np.testing.assert_allclose(adv, [0.5, -0.5, -0.5, 0.5])

    def test_all_scalings_match_numpy_on_random_rewards(self):
        rng = np.random.default_rng(0)
        r = rng.normal(size=12).astype(np.float32)
        for scale in ("group", "batch", "none"):
            adv, _ = grpo.group_advantages(jnp.asarray(r), 3, scale)
            np.testing.assert_allclose(adv, np_advantages(r, 3, scale), rtol=1e-5, atol=1e-6,
                                       err_msg=scale)

    def test_batch_scaling_uses_group_mean_and_batch_std(self):
        r = np.array([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 5.0], np.float32)
        adv, stats = grpo.group_advantages(jnp.asarray(r), 4, "batch")
        batch_std = r.std(ddof=1)
        expected = np.concatenate([r[:4] - 0.5, r[4:] - 3.5]) / (batch_std + 1e-4)
        np.testing.assert_allclose(adv, expected, rtol=1e-5)
        np.testing.assert_allclose(stats["reward_std"], batch_std, rtol=1e-5)

    def test_all_equal_group_has_zero_advantage_and_counts_as_zero_std(self):
        r = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3])
        for scale in ("group", "batch", "none"):
            adv, stats = grpo.group_advantages(r, 4, scale)
            np.testing.assert_array_equal(adv[:4], 0.0)
            np.testing.assert_array_equal(adv[8:], 0.0)
            np.testing.assert_allclose(stats["frac_reward_zero_std"], 2 / 3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_nan_rows_get_zero_advantage_and_leave_statistics(self):
        fn = self.variant(functools.partial(grpo.group_advantages, group_size=4,
                                            scale_rewards="group"))
        r = np.array([1.0, np.nan, 0.0, 1.0,  np.nan, np.nan, np.nan, np.nan,
                      2.0, np.nan, np.nan, np.nan], np.float32)
        adv, stats = fn(jnp.asarray(r))
        assert np.all(np.isfinite(adv))
        np.testing.assert_array_equal(np.asarray(adv)[np.isnan(r)], 0.0)
        np.testing.assert_allclose(adv, np_advantages(r, 4, "group"), rtol=1e-5, atol=1e-7)
        # Valid rows of group 0 are (1, 0, 1): mean 2/3, unbiased std 0.57735.
        np.testing.assert_allclose(adv[0], (1 / 3) / (np.sqrt(1 / 3) + 1e-4), rtol=1e-5)
        # Groups 1 (no rewards) and 2 (one reward) have std 0.
        np.testing.assert_allclose(stats["frac_reward_zero_std"], 2 / 3)
        np.testing.assert_allclose(stats["frac_reward_none"], 8 / 12)
        np.testing.assert_allclose(stats["reward_mean"], 1.0)

    def test_nan_rows_in_batch_scaling(self):
        r = np.array([1.0, np.nan, 0.0, 4.0, 2.0, 2.0], np.float32)
        adv, _ = grpo.group_advantages(jnp.asarray(r), 3, "batch")
        np.testing.assert_allclose(adv, np_advantages(r, 3, "batch"), rtol=1e-5)

    def test_group_size_one_has_zero_std(self):
        adv, stats = grpo.group_advantages(jnp.array([1.0, 0.0, 3.0]), 1, "group")
        np.testing.assert_array_equal(adv, 0.0)
        assert float(stats["frac_reward_zero_std"]) == 1.0

    def test_bad_arguments_raise(self):
        with pytest.raises(ValueError, match="scale_rewards='std'"):
            grpo.group_advantages(jnp.zeros(4), 4, "std")
        with pytest.raises(ValueError, match="group_size=3"):
            grpo.group_advantages(jnp.zeros(4), 3)


# ------------------------------------------------------------------------ token advantages
def test_token_advantages_broadcast_over_completion_tokens():
    mask = _uneven_mask(4, 6)
    adv = jnp.array([1.0, -2.0, 0.5, 3.0])
    out = grpo.token_advantages(adv, mask)
    np.testing.assert_allclose(out, np.asarray(adv)[:, None] * mask)


def test_token_advantages_weighted_credit_normalises_to_masked_mean_one():
    mask = _uneven_mask(4, 6)
    adv = jnp.array([1.0, -2.0, 0.5, 3.0])
    raw = np.random.default_rng(0).uniform(0.1, 2.0, mask.shape).astype(np.float32)
    w = grpo.normalize_credit(raw, mask)
    # Masked mean per row is 1 (row 3 has no tokens and stays all zero).
    rows = mask.sum(1) > 0
    np.testing.assert_allclose((np.asarray(w) * mask).sum(1)[rows] / mask.sum(1)[rows], 1.0,
                               rtol=1e-6)
    out = grpo.token_advantages(adv, mask, raw)  # the raw scale does not matter
    np.testing.assert_allclose(out, np.asarray(adv)[:, None] * np.asarray(w) * mask,
                               rtol=1e-6)
    np.testing.assert_allclose(grpo.token_advantages(adv, mask, 7.0 * raw), out, rtol=1e-5)
    # Total advantage mass per row is that of plain GRPO.
    np.testing.assert_allclose(np.asarray(out).sum(1), np.asarray(adv) * mask.sum(1),
                               rtol=1e-5)
    jitted = jax.jit(lambda a, m, c: grpo.token_advantages(a, m, c))(adv, mask, raw)
    np.testing.assert_allclose(jitted, out, rtol=1e-6)
    with pytest.raises(ValueError, match="credit weights have shape"):
        grpo.token_advantages(adv, mask, jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="token credit mode 'gaze'"):
        grpo.token_advantages(adv, mask, raw, mode="gaze")


def test_token_advantages_reward_to_go_matches_numpy_return_to_go():
    mask = _uneven_mask(4, 6)
    adv = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    raw = np.random.default_rng(1).uniform(0.1, 2.0, mask.shape).astype(np.float32)
    out = np.asarray(grpo.token_advantages(adv, mask, raw, mode="reward_to_go"))
    for i in range(4):
        n = int(mask[i].sum())
        if n == 0:
            np.testing.assert_array_equal(out[i], 0.0)
            continue
        p = raw[i, :n] / raw[i, :n].sum()
        ref = adv[i] * np.cumsum(p[::-1])[::-1]  # return-to-go of the spread advantage
        np.testing.assert_allclose(out[i, :n], ref, rtol=1e-5)
        np.testing.assert_allclose(out[i, 0], adv[i], rtol=1e-5)  # the first token: A_i
        np.testing.assert_array_equal(out[i, n:], 0.0)
    # Without credit, reward-to-go spreads uniformly: A_i * (n - t) / n.
    uni = np.asarray(grpo.token_advantages(adv, mask, None, mode="reward_to_go"))
    n0 = int(mask[0].sum())
    np.testing.assert_allclose(uni[0, :n0], adv[0] * (n0 - np.arange(n0)) / n0, rtol=1e-6)


def test_normalize_credit_zero_row_falls_back_to_uniform():
    mask = np.ones((1, 3), np.float32)
    np.testing.assert_allclose(grpo.normalize_credit(np.zeros((1, 3)), mask), mask)


# -------------------------------------------------------------------------- per-token loss
EPS, EPS_HIGH = 0.2, 0.28


def _loss_and_grad(log_ratio, adv, **kw):
    """Loss and d loss / d logp for one token with logp - old_logp = log_ratio."""
    old = jnp.array([[-1.0]])
    mask = jnp.ones((1, 1))

    def f(logp):
        loss, _ = grpo.per_token_loss(logp, old, jnp.array([adv]), mask, epsilon=EPS,
                                      epsilon_high=EPS_HIGH, **kw)
        return loss[0, 0]
    return jax.value_and_grad(f)(old + log_ratio)


def test_positive_advantage_above_clip_is_constant_with_zero_gradient():
    value, grad = _loss_and_grad(np.log(1.35), 1.0)
    np.testing.assert_allclose(value, -1.28, rtol=1e-6)  # objective min(1.35, 1.28) = 1.28
    assert float(grad[0, 0]) == 0.0


def test_negative_advantage_below_clip_is_constant_with_zero_gradient():
    value, grad = _loss_and_grad(np.log(0.7), -1.0)
    np.testing.assert_allclose(value, 0.8, rtol=1e-6)  # objective min(-0.7, -0.8) = -0.8
    assert float(grad[0, 0]) == 0.0


def test_negative_advantage_above_clip_gradient_flows_and_delta_caps_it():
    value, grad = _loss_and_grad(np.log(1.5), -1.0)
    np.testing.assert_allclose(value, 1.5, rtol=1e-6)  # objective min(-1.5, -1.28) = -1.5
    np.testing.assert_allclose(grad[0, 0], 1.5, rtol=1e-5)  # d(rho)/d logp = rho
    value, grad = _loss_and_grad(np.log(1.5), -1.0, delta=1.4)
    np.testing.assert_allclose(value, 1.4, rtol=1e-6)
    assert float(grad[0, 0]) == 0.0
    value, _ = _loss_and_grad(np.log(1.3), -1.0, delta=1.4)  # below the cap: unchanged
    np.testing.assert_allclose(value, 1.3, rtol=1e-6)


def test_k3_kl_sanity_number_and_beta_term():
    logp, ref = jnp.array([[-1.0]]), jnp.array([[-1.2]])
    loss, m = grpo.per_token_loss(logp, logp, jnp.array([0.0]), jnp.ones((1, 1)),
                                  beta=0.5, ref_logp=ref)
    np.testing.assert_allclose(m["kl"][0, 0], 0.01873, atol=1e-5)
    np.testing.assert_allclose(loss[0, 0], 0.5 * 0.018730753, rtol=1e-5)
    _, m0 = grpo.per_token_loss(logp, logp, jnp.array([0.0]), jnp.ones((1, 1)))
    assert "kl" not in m0
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo.per_token_loss(logp, logp, jnp.array([0.0]), jnp.ones((1, 1)), beta=0.1)


def test_ratio_is_exactly_one_on_first_iteration_and_gradient_is_policy_gradient():
    rng = np.random.default_rng(1)
    logp = jnp.asarray(-rng.uniform(0.1, 3.0, (4, 6)), jnp.float32)
    mask = jnp.asarray(_uneven_mask(4, 6))
    adv = jnp.array([1.0, -0.5, 2.0, 0.0])

    def f(lp):
        loss, m = grpo.per_token_loss(lp, lp, adv, mask)
        return jnp.sum(loss), m
    (total, m), grad = jax.value_and_grad(f, has_aux=True)(logp)
    np.testing.assert_allclose(total, -(np.asarray(adv)[:, None] * np.asarray(mask)).sum(),
                               rtol=1e-6)
    np.testing.assert_allclose(grad, -np.asarray(adv)[:, None] * np.asarray(mask), rtol=1e-6)
    np.testing.assert_array_equal(m["is_region_clipped"], 0.0)


def test_per_token_loss_and_clip_metrics_match_numpy():
    rng = np.random.default_rng(2)
    n, t = 8, 6
    logp = -rng.uniform(0.1, 3.0, (n, t)).astype(np.float32)
    old = logp + rng.normal(0, 0.4, (n, t)).astype(np.float32)
    ref = logp + rng.normal(0, 0.3, (n, t)).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    mask = _uneven_mask(n, t)
    loss, m = jax.jit(functools.partial(grpo.per_token_loss, epsilon=EPS, epsilon_high=EPS_HIGH,
                                        beta=0.04, delta=2.0))(logp, old, adv, mask,
                                                               ref_logp=ref)
    expected = np_token_loss(logp, old, adv, EPS, EPS_HIGH, 0.04, ref, 2.0) * mask
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    ratio = np.exp(logp - old)
    low = (ratio < 1 - EPS) & (adv[:, None] < 0) & (mask > 0)
    high = (ratio > 1 + EPS_HIGH) & (adv[:, None] > 0) & (mask > 0)
    np.testing.assert_array_equal(m["is_low_clipped"], low)
    np.testing.assert_array_equal(m["is_high_clipped"], high)
    np.testing.assert_array_equal(m["is_region_clipped"], low | high)
    assert low.any() and high.any()


def test_masked_positions_with_inf_logp_give_no_nan_in_loss_or_gradient():
    logp = jnp.array([[-1.0, -jnp.inf]])
    mask = jnp.array([[1.0, 0.0]])

    def f(lp):
        loss, _ = grpo.per_token_loss(lp, jnp.array([[-1.1, 0.0]]), jnp.array([1.0]), mask,
                                      beta=0.1, ref_logp=jnp.array([[-1.0, -jnp.inf]]))
        return grpo.aggregate(loss, mask, "grpo")[0]
    value, grad = jax.value_and_grad(f)(logp)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))


def test_log_ratio_is_clamped_against_overflow():
    loss, _ = grpo.per_token_loss(jnp.array([[0.0]]), jnp.array([[-200.0]]), jnp.array([-1.0]),
                                  jnp.ones((1, 1)))
    np.testing.assert_allclose(loss[0, 0], np.exp(grpo.LOG_RATIO_CLAMP), rtol=1e-5)


# ----------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_aggregate_matches_numpy_on_uneven_masks_with_an_empty_row(loss_type):
    rng = np.random.default_rng(3)
    mask = _uneven_mask(8, 6)
    loss = rng.normal(size=mask.shape).astype(np.float32)
    loss[3] = np.nan  # the all-masked row's values must not leak
    s, c = jax.jit(functools.partial(grpo.aggregate, loss_type=loss_type,
                                     max_completion_length=6))(loss, mask)
    assert np.isfinite(float(s))
    np.testing.assert_allclose(float(s) / max(float(c), 1.0),
                               np_aggregate(np.nan_to_num(loss), mask, loss_type, 6), rtol=1e-5)


def test_aggregate_pairs_are_as_documented():
    mask = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]], np.float32)
    loss = np.array([[1, 3, 9], [5, 5, 5], [3, 3, 3]], np.float32)
    pairs = {k: tuple(float(x) for x in grpo.aggregate(loss, mask, k, 4))
             for k in grpo.LOSS_TYPES}
    assert pairs["grpo"] == (2.0 + 0.0 + 3.0, 3.0)
    np.testing.assert_allclose(pairs["bnpo"], (13.0 / 5.0, 1.0), rtol=1e-7)
    assert pairs["dr_grpo"] == (13.0 / 4.0, 3.0)
    assert pairs["dapo"] == (13.0, 5.0)
    np.testing.assert_array_equal(grpo.aggregate(np.ones((2, 3)), np.zeros((2, 3)), "grpo"),
                                  (0.0, 2.0))


def test_aggregate_errors():
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        grpo.aggregate(jnp.zeros((1, 1)), jnp.ones((1, 1)), "ppo")
    with pytest.raises(ValueError, match="needs max_completion_length"):
        grpo.aggregate(jnp.zeros((1, 1)), jnp.ones((1, 1)), "dr_grpo")


def test_register_loss_type_adds_a_variant_in_a_few_lines():
    name = "test_sum_over_sequences"
    try:
        @grpo.register_loss_type(name)
        def _seq_sum(lm, m, lmax):
            return jnp.sum(lm), jnp.asarray(lm.shape[0], jnp.float32)
        s, c = grpo.aggregate(jnp.ones((2, 3)), jnp.ones((2, 3)), name)
        assert (float(s), float(c)) == (6.0, 2.0)
        with pytest.raises(ValueError, match="already registered"):
            grpo.register_loss_type(name)(_seq_sum)
    finally:
        grpo.LOSS_TYPES.pop(name, None)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _accumulated(loss_type, num_micro, batch):
    """Loss and gradient through the real train-step accumulation (sum, then divide)."""
    def loss_fn(params, b, rng):
        del rng
        logp = b["offset"] + params[None, :]  # a toy "policy": logp depends on params
        return grpo.policy_loss(logp, b["old_logp"], b["adv"], b["mask"], loss_type=loss_type,
                                max_completion_length=8, epsilon=0.2, epsilon_high=0.28)
    grads, s, c, aux = accumulate_gradients(loss_fn, batch["params"], batch["data"],
                                            jax.random.key(0), num_micro)
    denom = jnp.maximum(c, 1.0)
    return s / denom, grads / denom, {k: v[0] / jnp.maximum(v[1], 1e-9) for k, v in aux.items()}


def _rl_batch(n=8, t=8):
    rng = np.random.default_rng(4)
    offset = -rng.uniform(0.2, 2.0, (n, t)).astype(np.float32)
    old = offset + rng.normal(0, 0.3, (n, t)).astype(np.float32)
    mask = np.zeros((n, t), np.float32)
    for i, L in enumerate([8, 1, 5, 0, 3, 8, 2, 6]):
        mask[i, :L] = 1.0
    adv = rng.normal(size=n).astype(np.float32)
    return {"params": jnp.zeros((t,)),
            "data": {"offset": offset, "old_logp": old, "mask": mask, "adv": adv}}


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_accumulation_invariance_micro_batches_equal_whole_batch(loss_type):
    batch = _rl_batch()
    l1, g1, aux1 = _accumulated(loss_type, 1, batch)
    l4, g4, aux4 = _accumulated(loss_type, 4, batch)
    np.testing.assert_allclose(l4, l1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g4, g1, rtol=1e-5, atol=1e-7)
    for k in aux1:
        np.testing.assert_allclose(aux4[k], aux1[k], rtol=1e-5, atol=1e-7, err_msg=k)
    d = batch["data"]
    expected = np_aggregate(np_token_loss(d["offset"], d["old_logp"], d["adv"], 0.2, 0.28),
                            d["mask"], loss_type, 8)
    np.testing.assert_allclose(l1, expected, rtol=1e-5)


def test_bnpo_accumulates_as_mean_of_micro_batch_token_means():
    batch = _rl_batch()
    l4, _, _ = _accumulated("bnpo", 4, batch)
    d = batch["data"]
    loss = np_token_loss(d["offset"], d["old_logp"], d["adv"], 0.2, 0.28)
    micro = [np.arange(8)[j::4] for j in range(4)]  # split_microbatches is strided
    expected = np.mean([np_aggregate(loss[r], d["mask"][r], "bnpo") for r in micro])
    np.testing.assert_allclose(l4, expected, rtol=1e-5)


# --------------------------------------------------------------------------------- metrics
def test_masked_mean_pair_and_token_entropy():
    s, w = grpo.masked_mean_pair(jnp.array([[1.0, jnp.nan], [3.0, 5.0]]),
                                 jnp.array([[1, 0], [1, 1]]))
    assert (float(s), float(w)) == (9.0, 3.0)
    logits = np.random.default_rng(5).normal(size=(2, 3, 7)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(grpo.token_entropy(logits), -(p * np.log(p)).sum(-1), rtol=1e-5)
    banned = jnp.array([0.0, 0.0, -jnp.inf, -jnp.inf])
    np.testing.assert_allclose(grpo.token_entropy(banned), np.log(2.0), rtol=1e-6)
