"""Fisher estimation: the diagonal Fisher against per-example references (a NumPy
lm_head gradient and one jax.grad per example), K-FAC factors against an explicit
computation, bitwise save/load, and refusal of a Fisher made for another model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.models import Transformer, init_params, tiny
from jaxpost.peft import fisher as FI

CFG = tiny("llama", num_layers=2, vocab_size=32, hidden_size=16, intermediate_size=32,
           num_heads=2, num_kv_heads=1, head_dim=8)
Q = ("layers", "self_attn", "q_proj", "kernel")
HEAD = ("lm_head", "kernel")


def _batch(seed=0, b=4, t=6):
    rng = np.random.default_rng(seed)
    mask = (rng.random((b, t)) < 0.6).astype(np.float32)
    mask[0] = 0.0  # a row without targets: skipped, not counted
    mask[1:, -1] = 1.0
    seg = np.ones((b, t), np.int32)
    seg[2, -2:] = 0  # padding at the end of one row
    mask[2, -2:] = 0.0
    return {"tokens": rng.integers(0, 32, (b, t)).astype(np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "segment_ids": seg, "loss_mask": mask}


@pytest.fixture(scope="module")
def setup():
    params = init_params(CFG, jax.random.key(0))
    return params, [_batch(0), _batch(1)]


def _softmax_grad_head(params, row):
    """NumPy ∂ℓ/∂W_head and the (hidden, output-gradient) pairs of one row (float64)."""
    one = {k: v[None] for k, v in row.items()}
    hidden = np.asarray(Transformer(CFG).apply(
        {"params": params}, one["tokens"], positions=one["positions"],
        segment_ids=one["segment_ids"], return_hidden=True)[0], np.float64)
    logits = hidden @ np.asarray(params["lm_head"]["kernel"], np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    g = np.zeros_like(p)
    t = row["tokens"].shape[0]
    for i in range(t - 1):
        m = row["loss_mask"][i + 1]
        onehot = np.eye(CFG.vocab_size)[row["tokens"][i + 1]]
        g[i] = m * (p[i] - onehot)  # ∂(−log p)/∂logits
    return hidden.T @ g, hidden, g


@pytest.mark.slow
def test_diagonal_fisher_equals_per_example_references(setup):
    params, batches = setup
    got = FI.diagonal_fisher(CFG, params, batches, FI.select_paths(params, [Q, HEAD]), chunk=2)
    rows = [{k: b[k][i] for k in b} for b in batches for i in range(4)
            if b["loss_mask"][i, 1:].sum() > 0]
    assert got.num_examples == len(rows) == 6
    head = np.mean([_softmax_grad_head(params, r)[0] ** 2 for r in rows], 0)
    np.testing.assert_allclose(got.tree["lm_head"]["kernel"], head, rtol=2e-4, atol=1e-9)

    def nll(q, row):
        p = {**params, "layers": {**params["layers"], "self_attn": {
            **params["layers"]["self_attn"], "q_proj": {"kernel": q}}}}
        one = {k: jnp.asarray(v)[None] for k, v in row.items()}
        logits = Transformer(CFG).apply({"params": p}, one["tokens"], positions=one["positions"],
                                        segment_ids=one["segment_ids"])
        logp = jax.nn.log_softmax(logits[0, :-1])
        return -jnp.sum(jnp.take_along_axis(logp, one["tokens"][0, 1:, None], -1)[:, 0]
                        * one["loss_mask"][0, 1:])
    grad = jax.jit(jax.grad(nll))
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    ref = np.mean([np.asarray(grad(q, r), np.float64) ** 2 for r in rows], 0)
    np.testing.assert_allclose(got.tree["layers"]["self_attn"]["q_proj"]["kernel"], ref,
                               rtol=1e-3, atol=1e-10)


@pytest.mark.slow
def test_kfac_factors_equal_an_explicit_computation(setup):
    params, batches = setup
    got = FI.kfac_factors(CFG, params, batches, [Q, HEAD], top_k_in=3, top_k_out=2)
    rows = [{k: b[k][i] for k in b} for b in batches for i in range(4)]
    s_in = sum(h[r["segment_ids"] != 0].T @ h[r["segment_ids"] != 0]
               for r in rows for _, h, _ in [_softmax_grad_head(params, r)])
    tokens = sum(int((r["segment_ids"] != 0).sum()) for r in rows)
    s_out = sum(g.T @ g for r in rows for _, _, g in [_softmax_grad_head(params, r)])
    head = got.tree["lm_head"]["kernel"]
    np.testing.assert_allclose(head["s_in"], s_in / tokens, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(head["s_out"], s_out / 6, rtol=2e-4, atol=1e-7)
    lam, u = np.linalg.eigh(np.asarray(head["s_in"], np.float64))
    np.testing.assert_allclose(head["lam_in"], lam[::-1][:3], rtol=1e-4)
    np.testing.assert_allclose(np.abs(np.sum(head["u_in"] * u[:, ::-1][:, :3], 0)), 1, atol=1e-3)
    # Inside the stack: Σ_t x_t g_tᵀ of one example is that example's kernel gradient.
    batch = jax.tree.map(jnp.asarray, batches[1])
    xs, gs = FI.linear_io(CFG, params, batch, [Q])
    per_layer = np.einsum("bti,bto->io", xs[(Q, 1)], gs[(Q, 1)])
    def total(q):
        p = {**params, "layers": {**params["layers"], "self_attn": {
            **params["layers"]["self_attn"], "q_proj": {"kernel": q}}}}
        return sum(FI._row_nll(Transformer(CFG), p, {k: v[i] for k, v in batch.items()})
                   for i in range(4))
    full = jax.jit(jax.grad(total))(params["layers"]["self_attn"]["q_proj"]["kernel"])
    np.testing.assert_allclose(per_layer, full[1], rtol=1e-3, atol=1e-6)
    q = got.tree["layers"]["self_attn"]["q_proj"]["kernel"]
    chex.assert_shape((q["s_in"], q["u_in"], q["lam_out"]), [(2, 16, 16), (2, 16, 3), (2, 2)])


def test_saved_fisher_reloads_bitwise_and_another_model_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    params = {"embed_tokens": {"embedding": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)},
              "lm_head": {"kernel": jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)}}
    batches = [_batch(0)]
    fisher = FI.Fisher("diagonal", {"lm_head": {"kernel": jnp.asarray(
        rng.random((16, 32)), jnp.float32)}}, 6, {})
    data = {"source": "align.jsonl", "digest": FI.data_digest(batches[:1])}
    fisher.fingerprint = FI.fingerprint(CFG, params, data)
    FI.save_fisher(fisher, tmp_path / "f")
    back = FI.load_fisher(tmp_path / "f", FI.fingerprint(CFG, params, data), kind="diagonal")
    np.testing.assert_array_equal(back.tree["lm_head"]["kernel"], fisher.tree["lm_head"]["kernel"])
    assert back.tree["lm_head"]["kernel"].dtype == fisher.tree["lm_head"]["kernel"].dtype
    assert back.num_examples == fisher.num_examples
    other = jax.tree.map(lambda x: x + 1e-2, params)
    with pytest.raises(FI.FisherMismatchError, match="another model.*param values differ"):
        FI.load_fisher(tmp_path / "f", FI.fingerprint(CFG, other, data))
    with pytest.raises(FI.FisherMismatchError, match="model.rope_theta: stored 10000.0, now 5"):
        FI.load_fisher(tmp_path / "f", FI.fingerprint(CFG.replace(rope_theta=5.0), params, data))
    wider = {**params, "lm_head": {"kernel": jnp.zeros((16, 40))}}
    with pytest.raises(FI.FisherMismatchError, match="param shapes differ for.*lm_head/kernel"):
        FI.load_fisher(tmp_path / "f", FI.fingerprint(CFG, wider, data))
    with pytest.raises(FI.FisherMismatchError, match="data.digest"):
        FI.load_fisher(tmp_path / "f", FI.fingerprint(CFG, params, {**data, "digest": "x"}))
    with pytest.raises(FI.FisherMismatchError, match="'kfac'"):
        FI.load_fisher(tmp_path / "f", kind="kfac")
