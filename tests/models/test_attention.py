"""The attention core against a NumPy reference, and the causal query blocks of the
cache-free path against the unblocked and the KV-cache paths."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxpost.models import KVCache, Transformer, init_params, tiny
from jaxpost.models import attention as attn
from jaxpost.models.attention import attend, causal_query_blocks, make_attention_mask


def _numpy_attention(qg, k, v, mask):
    """Masked softmax attention, one (batch, kv head, group, query) at a time; a query
    with no visible key (padding) is left at zero."""
    b, t, kv, g, hd = qg.shape
    out = np.zeros(qg.shape, np.float64)
    for i in range(b):
        for h in range(kv):
            for j in range(g):
                for q in range(t):
                    visible = np.flatnonzero(mask[i, q])
                    if visible.size == 0:
                        continue
                    s = k[i, h, visible] @ qg[i, q, h, j] / np.sqrt(hd)
                    p = np.exp(s - s.max())
                    out[i, q, h, j] = (p / p.sum()) @ v[i, h, visible]
    return out


def _inputs(t, seed=0):
    """GQA shapes (2 kv heads x 2 groups); row 0 packs two segments, row 1 ends in padding."""
    r = np.random.default_rng(seed)
    b, kv, g, hd = 2, 2, 2, 8
    qg = r.standard_normal((b, t, kv, g, hd)).astype(np.float32)
    k = r.standard_normal((b, kv, t, hd)).astype(np.float32)
    v = r.standard_normal((b, kv, t, hd)).astype(np.float32)
    seg = np.ones((b, t), np.int32)
    seg[0, t // 3:] = 2
    seg[1, t - t // 4:] = 0
    return qg, k, v, seg


@pytest.mark.parametrize("length,blocks", [
    (1, 1), (63, 1), (64, 1), (100, 1), (128, 2), (192, 3), (256, 4), (512, 8),
    (576, 8), (1024, 8), (4096, 8)])
def test_causal_query_blocks(length, blocks):
    assert causal_query_blocks(length) == blocks
    assert length % blocks == 0


class AttendTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1, 3, 8)
    def test_matches_numpy_on_visible_queries(self, blocks):
        t = 24
        qg, k, v, seg = _inputs(t)
        mask = make_attention_mask(jnp.asarray(seg))
        out = self.variant(lambda *a: attend(*a, causal_blocks=blocks))(qg, k, v, mask)
        chex.assert_shape(out, qg.shape)
        visible = np.asarray(seg) != 0  # padding queries see no key: their output is free
        want = _numpy_attention(qg, k, v, np.asarray(mask))
        chex.assert_trees_all_close(np.asarray(out)[visible], want[visible],
                                    atol=2e-5, rtol=2e-5)

    def test_blocks_must_divide_a_square_mask(self):
        qg, k, v, seg = _inputs(24)
        mask = make_attention_mask(jnp.asarray(seg))
        with pytest.raises(ValueError, match="causal_blocks=5"):
            attend(qg, k, v, mask, causal_blocks=5)
        with pytest.raises(ValueError, match="as many keys as queries"):
            attend(qg[:, :12], k, v, mask[:, :12], causal_blocks=2)


@pytest.mark.slow
def test_blocked_gradients_equal_the_unblocked():
    qg, k, v, seg = _inputs(24, seed=1)
    mask = make_attention_mask(jnp.asarray(seg))
    w = jnp.asarray(seg != 0, jnp.float32)[:, :, None, None, None]
    ct = jax.random.normal(jax.random.key(0), qg.shape) * w  # no cotangent on padding

    def loss(blocks):
        return lambda *a: jnp.sum(attend(*a, mask, causal_blocks=blocks) * ct)
    want = jax.grad(loss(1), argnums=(0, 1, 2))(qg, k, v)
    for blocks in (3, 8):
        got = jax.jit(jax.grad(loss(blocks), argnums=(0, 1, 2)))(qg, k, v)
        chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_blocked_forward_equals_the_unblocked_and_the_cache_path(monkeypatch):
    """At 2 x 64 positions the cache-free forward runs in 2 query blocks; the same tokens
    through a KV cache (never blocked) and with blocking switched off give its logits."""
    cfg = tiny("llama")
    t = 2 * attn.CAUSAL_BLOCK
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, t), 0, cfg.vocab_size)
    seg = np.ones((2, t), np.int32)
    seg[0, 50:] = 2  # two packed examples, the second crossing the block boundary
    seg[1, 100:] = 0  # trailing padding
    visible = seg != 0
    model = Transformer(cfg)
    blocked = model.apply({"params": params}, tokens, segment_ids=jnp.asarray(seg))

    with monkeypatch.context() as m:
        m.setattr(attn, "causal_query_blocks", lambda length: 1)
        plain = model.apply({"params": params}, tokens, segment_ids=jnp.asarray(seg))
    chex.assert_trees_all_close(np.asarray(blocked)[visible], np.asarray(plain)[visible],
                                atol=1e-5, rtol=1e-5)

    # Row 1 alone (one segment, no padding inside the first 100 tokens) through a cache.
    cache = KVCache.init(cfg, 1, t)
    cached, _ = model.apply({"params": params}, tokens[1:, :100], cache=cache)
    chex.assert_trees_all_close(cached[0], blocked[1, :100], atol=1e-5, rtol=1e-5)
