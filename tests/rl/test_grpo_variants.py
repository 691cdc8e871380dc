"""TRL 1.16's GRPO variants (cispo, sapo, luspo, vespo, GSPO, the KL bias correction, GDPO,
the entropy mask and bonus, the off-policy mask) against hand-checked numbers and a
NumPy transcription of TRL's `_compute_loss`."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.rl import grpo

ONE = jnp.ones((1, 1))


def _value_and_grad(logp, old, adv, mask=None, **kw):
    """Loss (the aggregated mean) and d loss / d logp."""
    mask = jnp.ones_like(logp) if mask is None else mask

    def f(lp):
        s, c, aux = grpo.policy_loss(lp, old, jnp.asarray(adv, jnp.float32), mask, **kw)
        return s / jnp.maximum(c, 1.0), aux
    (value, aux), grad = jax.value_and_grad(f, has_aux=True)(logp)
    return float(value), np.asarray(grad), {k: float(s / w) for k, (s, w) in aux.items()}


# ------------------------------------------------------------------ hand-checked numbers
def test_cispo_weights_are_clipped_and_detached():
    # rho = e^0.5 = 1.64872; A = 2; logp = -1: loss = -rho * A * logp = 3.29744.
    logp, old = jnp.array([[-1.0]]), jnp.array([[-1.5]])
    v, g, aux = _value_and_grad(logp, old, [2.0], loss_type="cispo", epsilon_high=5.0)
    np.testing.assert_allclose(v, 3.2974425, rtol=1e-6)
    np.testing.assert_allclose(g, [[-3.2974425]], rtol=1e-6)  # -w A: w gets no gradient
    assert aux["cispo_clip_ratio"] == 0.0
    # The cap: epsilon_high = 1.2 < rho -> w = 1.2, loss 2.4, counted as clipped.
    v, g, aux = _value_and_grad(logp, old, [2.0], loss_type="cispo", epsilon_high=1.2)
    np.testing.assert_allclose((v, g[0, 0]), (2.4, -2.4), rtol=1e-6)
    assert aux["cispo_clip_ratio"] == 1.0


def test_sapo_soft_gate_and_its_temperatures():
    # rho = e^0.2 = 1.22140. A = +1, tau_pos = 1: -(4/1) sigmoid(0.22140) = -2.22050.
    logp, old = jnp.array([[-1.0]]), jnp.array([[-1.2]])
    v, g, _ = _value_and_grad(logp, old, [1.0], loss_type="sapo")
    np.testing.assert_allclose(v, -2.2205028, rtol=1e-6)
    s = 1 / (1 + math.exp(-(math.exp(0.2) - 1)))
    np.testing.assert_allclose(g[0, 0], -4 * s * (1 - s) * math.exp(0.2), rtol=1e-5)
    # A = -1, tau_neg = 1.05: (4/1.05) sigmoid(1.05 * 0.22140) = 2.12517.
    v, _, _ = _value_and_grad(logp, old, [-1.0], loss_type="sapo")
    np.testing.assert_allclose(v, 2.1251729, rtol=1e-6)
    # On-policy the gate's gradient is the policy gradient's, -A.
    _, g, _ = _value_and_grad(logp, logp, [1.5], loss_type="sapo", sapo_temperature_pos=3.0)
    np.testing.assert_allclose(g, [[-1.5]], rtol=1e-6)


def test_vespo_gamma_weight_of_the_summed_sequence_log_ratio():
    # log-ratios 0.1 and -0.3: sum -0.2, w = e^-0.2 = 0.81873.
    # A >= 0 (k 2, lambda 3): phi = exp(3 - 0.4 - 3 w) = 1.15466;
    # A < 0 (k 3, lambda 2): phi = exp(2 - 0.6 - 2 w) = 0.78863.
    logp = jnp.array([[-1.0, -2.0]])
    old = logp - jnp.array([[0.1, -0.3]])
    for adv, phi in ((1.0, 1.1546621), (-1.0, 0.7886272)):
        v, g, aux = _value_and_grad(logp, old, [adv], loss_type="vespo")
        np.testing.assert_allclose(aux["vespo/phi_seq_mean"], phi, rtol=1e-5)
        # dapo-style mean over the two tokens of -phi * A * logp; phi gets no gradient.
        np.testing.assert_allclose(v, -phi * adv * (-3.0) / 2, rtol=1e-5)
        np.testing.assert_allclose(g, [[-phi * adv / 2] * 2], rtol=1e-5)
    # phi(1) = 1: on-policy it is the plain policy gradient.
    _, _, aux = _value_and_grad(logp, logp, [1.0], loss_type="vespo")
    np.testing.assert_allclose(aux["vespo/phi_seq_mean"], 1.0, rtol=1e-6)


def test_sequence_level_ratio_and_luspo_length_scaling():
    # GSPO: log-ratios 0.1 and -0.3 (mean -0.1): one ratio e^-0.1 = 0.904837 per row.
    # With A = -1 the clipped surrogate is rho * 1 per token (inside the clip range);
    # luspo sums the two tokens (length 2) and averages over the rows (one).
    logp = jnp.array([[-1.0, -2.0, 0.0]])
    old = logp - jnp.array([[0.1, -0.3, 0.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    v, g, aux = _value_and_grad(logp, old, [-1.0], mask, loss_type="luspo",
                                importance_sampling_level="sequence")
    np.testing.assert_allclose(v, 2 * 0.9048374, rtol=1e-6)
    # d/dlogp_t of 2 * exp(mean log-ratio) = 2 * rho / 2 per valid token.
    np.testing.assert_allclose(g, [[0.9048374, 0.9048374, 0.0]], rtol=1e-6)
    assert aux["clip_ratio/region_mean"] == 0.0
    v, _, _ = _value_and_grad(logp, old, [-1.0], mask, loss_type="grpo",
                              importance_sampling_level="sequence")
    np.testing.assert_allclose(v, 0.9048374, rtol=1e-6)  # grpo: the per-row token mean


def test_kl_bias_correction_weights_the_k3_kl_by_the_differentiable_ratio():
    # logp -1, ref -1.2: k3 = 0.0187308; rho = e^0.5 -> corrected 0.0308818.
    logp, old, ref = jnp.array([[-1.0]]), jnp.array([[-1.5]]), jnp.array([[-1.2]])
    kw = dict(loss_type="dapo", beta=1.0, ref_logp=ref, epsilon=0.99, epsilon_high=10.0)
    v, g, aux = _value_and_grad(logp, old, [0.0], **kw)
    np.testing.assert_allclose((v, aux["kl"]), (0.0308818, 0.0308818), rtol=1e-5)
    # d/dlogp [rho * k3] = rho * (k3 + 1 - e^(ref - logp)) = e^0.5 (0.0187308 + 1 - e^-0.2)
    np.testing.assert_allclose(g[0, 0], math.exp(0.5) * (0.0187308 + 1 - math.exp(-0.2)),
                               rtol=1e-5)
    v, g, aux = _value_and_grad(logp, old, [0.0], **kw, use_bias_correction_kl=False)
    np.testing.assert_allclose((v, g[0, 0]), (0.0187308, 1 - math.exp(-0.2)), rtol=1e-5)
    # On-policy the value is unchanged but the gradient is not (TRL's documented caveat).
    v1, g1, _ = _value_and_grad(logp, logp, [0.0], **kw)
    v0, g0, _ = _value_and_grad(logp, logp, [0.0], **kw, use_bias_correction_kl=False)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(g1 - g0, [[0.0187308]], rtol=1e-4)
    # Sequence level: the sequence weight e^0.5 multiplies every token's KL.
    _, _, aux = _value_and_grad(jnp.array([[-1.0, -1.0]]), jnp.array([[-1.5, -1.5]]), [0.0],
                                **dict(kw, ref_logp=jnp.array([[-1.2, -1.2]])),
                                importance_sampling_level="sequence")
    np.testing.assert_allclose(aux["kl"], 0.0308818, rtol=1e-5)


def test_off_policy_sequence_mask_drops_negative_far_off_policy_rows():
    # Row 0: A < 0, mean(old - logp) = 0.3 > 0.2: dropped. Row 1: same KL, A > 0: kept.
    # Row 2: A < 0, KL 0.1: kept.
    logp = jnp.full((3, 2), -1.0)
    old = logp + jnp.array([[0.2, 0.4], [0.2, 0.4], [0.1, 0.1]])
    adv = jnp.array([-1.0, 1.0, -1.0])
    keep = grpo.off_policy_sequence_mask(adv[:, None], logp, old, jnp.ones((3, 2)), 0.2)
    chex.assert_trees_all_equal(keep, jnp.array([[0.0], [1.0], [1.0]]))
    loss, _ = grpo.per_token_loss(logp, old, adv, jnp.ones((3, 2)), off_policy_mask_threshold=0.2)
    assert float(jnp.abs(loss[0]).sum()) == 0.0 and float(jnp.abs(loss[2]).sum()) > 0


def test_high_entropy_mask_keeps_the_top_quantile_like_torch_quantile():
    h = jnp.array([[0.1, 0.5, 0.9, 7.0], [0.3, 0.7, 2.0, 5.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # Valid entropies 0.1 0.3 0.5 0.7 0.9 2.0 5.0; the 0.6-quantile (linear) is 0.82.
    got = grpo.high_entropy_mask(h, mask, 0.6)
    chex.assert_trees_all_equal(got, jnp.array([[0, 0, 1, 0], [0, 0, 1, 1]], jnp.float32))
    chex.assert_trees_all_equal(grpo.high_entropy_mask(h, jnp.zeros_like(h), 0.5),
                                jnp.zeros_like(h))


def test_entropy_bonus_is_the_mean_entropy_of_the_tokens_the_policy_term_acts_on():
    logp = jnp.array([[-1.0, -2.0, -0.5]])
    h = jnp.array([[1.0, 2.0, 4.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    kw = dict(loss_type="dapo", entropies=h)
    s, c, aux = grpo.policy_loss(logp, logp, jnp.array([1.0]), mask, **kw,
                                 entropy_coef=jnp.float32(0.1))
    # policy -A per token: -2 over 2 tokens = -1; bonus 0.1 * mean(1, 2) = 0.15.
    np.testing.assert_allclose(float(s / c), -1.15, rtol=1e-6)
    np.testing.assert_allclose(float(aux["policy_loss"][0] / aux["policy_loss"][1]), -1.0)
    np.testing.assert_allclose(float(aux["entropy_bonus/entropy"][0]
                                     / aux["entropy_bonus/entropy"][1]), 1.5)
    # top_entropy_quantile 0.5 keeps the token with entropy >= 1.5: only the second.
    s, c, aux = grpo.policy_loss(logp, logp, jnp.array([1.0]), mask, **kw,
                                 top_entropy_quantile=0.5, entropy_coef=jnp.float32(0.1))
    np.testing.assert_allclose(float(s / c), -1.0 / 2 - 0.1 * 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="need entropies"):
        grpo.policy_loss(logp, logp, jnp.array([1.0]), mask, top_entropy_quantile=0.5)


def test_decoupled_advantages_hand_numbers():
    # One group of 4, two rewards, weights (1, 2). r1 = (1, 0, 0, 1): normalised
    # +-0.5/0.57735 = +-0.86588 (std + 1e-4); r2 = (0, 0, 0, 3): (-0.75, -0.75, -0.75, 2.25)
    # / 1.5001 = (-0.49997, ..., 1.49990). Sum with weights: (-0.13406, -1.86582,
    # -1.86582, 3.86568)... then batch-normalised.
    r = jnp.array([[1, 0], [0, 0], [0, 0], [1, 3]], jnp.float32)
    adv, stats = grpo.decoupled_advantages(r, jnp.array([1.0, 2.0]), 4)
    n1 = np.array([1, -1, -1, 1]) * 0.5 / (0.5773503 + 1e-4)
    n2 = np.array([-0.75, -0.75, -0.75, 2.25]) / (1.5 + 1e-4)
    s = n1 + 2 * n2
    expected = (s - s.mean()) / (s.std(ddof=1) + 1e-4)
    chex.assert_trees_all_close(adv, expected, rtol=1e-5)
    np.testing.assert_allclose(s[0], -0.1340, atol=1e-3)
    assert float(stats["frac_reward_zero_std"]) == 0.0
    # A row no function scores has advantage 0; a group where no reward varies counts.
    r2 = jnp.array([[1, 1], [1, 1], [np.nan, np.nan], [1, 1]], jnp.float32)
    adv, stats = grpo.decoupled_advantages(jnp.concatenate([r, r2]), jnp.array([1.0, 2.0]), 4)
    assert float(adv[6]) == 0.0 and float(stats["frac_reward_zero_std"]) == 0.5
    np.testing.assert_allclose(float(stats["frac_reward_none"]), 1 / 8)


# ------------------------------------------------------- NumPy transcription of TRL 1.16
def np_trl_loss(loss_type, logp, old, adv, mask, *, ref=None, beta=0.0, corr=True,
                level="token", eps=0.2, eps_high=0.28, delta=None, tau=(1.0, 1.05),
                vespo=(2.0, 3.0, 3.0, 2.0), lmax=None):
    """TRL 1.16 `_compute_loss` (one micro-batch, one process), in float64 NumPy."""
    a = adv[:, None]
    log_ratio = logp - old
    if level == "token":
        lw = log_ratio
    else:
        lw = ((log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1))[:, None]
    c1 = np.exp(lw)
    if loss_type == "cispo":
        loss = -np.minimum(c1, eps_high) * a * logp
    elif loss_type == "sapo":
        t = np.where(a > 0, tau[0], tau[1])
        loss = -(1 / (1 + np.exp(-t * (c1 - 1)))) * 4 / t * a
    elif loss_type == "vespo":
        kp, lp, kn, ln = vespo
        lws = np.clip((np.clip(log_ratio, -20, 20) * mask).sum(-1, keepdims=True),
                      math.log(1e-8), 20)
        k, lam = np.where(a >= 0, kp, kn), np.where(a >= 0, lp, ln)
        loss = -np.exp(lam + k * lws - lam * np.exp(lws)) * a * logp
    else:
        c2 = np.clip(c1, 1 - eps, 1 + eps_high)
        cc = c1 if delta is None else np.minimum(c1, delta)
        loss = -np.minimum(cc * a, c2 * a)
    loss = np.broadcast_to(loss, mask.shape)
    if beta:
        x = ref - logp
        loss = loss + beta * (np.exp(x) - x - 1) * (c1 if corr else 1.0)
    lm = loss * mask
    if loss_type in ("grpo", "sapo"):
        return np.mean(lm.sum(-1) / np.maximum(mask.sum(-1), 1))
    if loss_type == "bnpo":
        return lm.sum() / max(mask.sum(), 1)
    if loss_type == "dr_grpo":
        return lm.sum() / (len(lm) * lmax)
    if loss_type == "luspo":
        return lm.sum(-1).mean()
    return lm.sum() / max(mask.sum(), 1)


@pytest.fixture(scope="module")
def rl_batch():
    rng = np.random.default_rng(7)
    n, t = 6, 5
    logp = -rng.uniform(0.2, 3.0, (n, t))
    mask = (np.arange(t)[None] < np.array([5, 1, 3, 0, 4, 5])[:, None]).astype(np.float64)
    return dict(logp=logp, old=logp + rng.normal(0, 0.4, (n, t)),
                ref=logp + rng.normal(0, 0.3, (n, t)), adv=rng.normal(size=n), mask=mask)


@pytest.mark.parametrize("loss_type,level,corr", [
    ("cispo", "token", True), ("sapo", "token", False), ("luspo", "sequence", True),
    ("vespo", "token", True), ("grpo", "sequence", True), ("dapo", "token", False),
    ("dr_grpo", "sequence", True)])
def test_loss_types_match_a_numpy_transcription_of_trl(rl_batch, loss_type, level, corr):
    b = rl_batch
    eps_high = 1.3 if loss_type == "cispo" else 0.28
    s, c, _ = grpo.policy_loss(
        *(jnp.asarray(b[k], jnp.float32) for k in ("logp", "old", "adv", "mask")),
        loss_type=loss_type, importance_sampling_level=level, use_bias_correction_kl=corr,
        beta=0.04, ref_logp=jnp.asarray(b["ref"], jnp.float32), epsilon_high=eps_high,
        delta=1.6, max_completion_length=5)
    expected = np_trl_loss(loss_type, b["logp"], b["old"], b["adv"], b["mask"], ref=b["ref"],
                           beta=0.04, corr=corr, level=level, eps_high=eps_high, delta=1.6,
                           lmax=5)
    np.testing.assert_allclose(float(s / max(float(c), 1.0)), expected, rtol=2e-5)


# ------------------------------------------------------------------ recipe-level pieces
def test_reference_sync_mixes_every_tau_steps_and_respects_frozen_rows():
    from jaxpost.train.grpo import ReferenceSyncState, reference_sync
    masks = {"w": np.array([1.0, 0.0], np.float32).reshape(2, 1), "b": None}
    opt = optax.chain(optax.sgd(1.0), reference_sync(0.6, 2, masks))
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}
    state = opt.init(params)
    grads = {"w": -jnp.ones((2, 3)), "b": -jnp.ones((3,))}
    for step in (1, 2, 3):
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, jax.tree.map(
            lambda u, m: u if m is None else u * m, updates, masks,
            is_leaf=lambda x: x is None))
        ref = state[1].reference
        assert isinstance(state[1], ReferenceSyncState)
        if step == 1:  # not yet due: the start
            chex.assert_trees_all_equal(ref, jax.tree.map(jnp.zeros_like, params))
    # Synced after step 2 (params 2): 0.6 * 2 = 1.2; step 3 leaves it; frozen row stays 0.
    np.testing.assert_allclose(ref["w"], [[1.2] * 3, [0.0] * 3])
    np.testing.assert_allclose(ref["b"], [1.2] * 3)


def test_adaptive_entropy_controller_and_its_state_round_trip():
    from jaxpost.train.grpo import EntropyController, GRPOSection
    g = GRPOSection(entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=1.0,
                    entropy_coef_delta=0.02, entropy_coef_max=0.04)
    c = EntropyController(g)
    assert c.applied() == 0.0  # nothing measured yet: no bonus (TRL: last entropy = inf)
    c.observe(0.5)  # below target: +delta, and applied next step
    assert (c.coef, c.applied()) == (pytest.approx(0.03), pytest.approx(0.03))
    c.observe(0.9)
    assert c.coef == pytest.approx(0.04)  # capped
    c.observe(2.0)  # above target: -delta, and not applied
    assert (c.coef, c.applied()) == (pytest.approx(0.02), 0.0)
    d = EntropyController(g)
    d.load(c.state())
    assert (d.coef, d.last_entropy) == (c.coef, c.last_entropy)
    e = EntropyController(g)
    e.load(EntropyController(g).state())  # inf survives JSON as None
    assert math.isinf(e.last_entropy)


@pytest.mark.parametrize("over,match", [
    (dict(loss_type="luspo"), "needs importance_sampling_level='sequence'"),
    (dict(sync_ref_model=True), "beta=0"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(beta=0.1, sync_ref_model=True, ref_model_sync_steps=0), "ref_model_sync_steps"),
])
def test_bad_variant_settings_are_refused_naming_the_key(over, match):
    from jaxpost.train.grpo import GRPOSection
    with pytest.raises(ValueError, match=match):
        GRPOSection(**over)
