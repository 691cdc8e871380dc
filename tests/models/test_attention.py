"""The attention core against a NumPy reference, the causal query blocks of the
cache-free path against the unblocked and the KV-cache paths, and the group-shared
prefix of a KV cache (`KVCache.share_rows`) against per-row copies of it."""

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


    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1, 5)
    def test_shared_prefix_matches_numpy_over_the_joined_keys(self, t):
        """3 groups of 2 rows: each row attends to its group's prefix (padded on the left
        in group 1) and then to its own keys, as one softmax over both."""
        r = np.random.default_rng(1)
        groups, n, kv, g, hd, p, s = 3, 2, 2, 2, 8, 6, 7
        b = groups * n
        qg = r.standard_normal((b, t, kv, g, hd)).astype(np.float32)
        pk, pv = (r.standard_normal((groups, kv, p, hd)).astype(np.float32) for _ in "kv")
        k, v = (r.standard_normal((b, kv, s, hd)).astype(np.float32) for _ in "kv")
        key_mask = np.ones((b, p + s), bool)
        key_mask[n:2 * n, :2] = False  # group 1's prompt is two slots shorter
        key_mask[:, p + t + 1:] = False  # own slots not yet written
        mask = np.broadcast_to(key_mask[:, None], (b, t, p + s)).copy()
        mask[:, :, p:p + t] &= np.tril(np.ones((t, t), bool))  # causal among the own keys
        out = self.variant(lambda *a: attend(*a[:4], prefix=a[4:]))(qg, k, v, mask, pk, pv)
        chex.assert_shape(out, qg.shape)
        full_k = np.concatenate([np.repeat(pk, n, 0), k], axis=2)
        full_v = np.concatenate([np.repeat(pv, n, 0), v], axis=2)
        chex.assert_trees_all_close(np.asarray(out), _numpy_attention(qg, full_k, full_v, mask),
                                    atol=2e-5, rtol=2e-5)

    def test_shared_prefix_rows_must_be_whole_groups(self):
        qg = np.zeros((5, 1, 2, 2, 8), np.float32)
        k = np.zeros((5, 2, 3, 8), np.float32)
        pk = np.zeros((2, 2, 4, 8), np.float32)
        with pytest.raises(ValueError, match="5 query rows are not whole groups of the "
                                             "prefix's 2"):
            attend(qg, k, k, np.ones((5, 1, 7), bool), prefix=(pk, pk))


@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
def test_share_rows_keeps_the_prefix_once_and_gives_each_row_its_own_slots(layout):
    cfg = tiny("llama", num_layers=2)
    cache = KVCache.init(cfg, 2, 5, layer_params=layout)
    cache = cache.replace(key_mask=cache.key_mask.at[1, :2].set(False).at[0].set(True)
                          .at[1, 2:].set(True), index=jnp.int32(5))
    shared = cache.share_rows(3, 4)
    own = (2 * 3, cfg.num_kv_heads, 4, cfg.head_dim)
    pre = (2, cfg.num_kv_heads, 5, cfg.head_dim)
    lead = (cfg.num_layers,) if layout == "stacked" else ()
    for leaf in jax.tree.leaves(shared.k):
        chex.assert_shape(leaf, lead + own)
    for leaf in jax.tree.leaves(shared.prefix_k):
        chex.assert_shape(leaf, lead + pre)
    assert shared.max_len == 9 and int(shared.index) == 5
    want = np.zeros((6, 9), bool)
    want[:3, :5] = True
    want[3:, 2:5] = True
    np.testing.assert_array_equal(shared.key_mask, want)
    axes = KVCache.logical_axes(layout, cfg.num_layers, shared_prefix=True)
    is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, str) for n in x)  # noqa: E731
    assert (jax.tree.structure(axes, is_leaf=is_names).num_leaves
            == jax.tree.structure(shared).num_leaves)
    with pytest.raises(ValueError, match="already has a shared prefix"):
        shared.share_rows(2, 1)


@pytest.mark.slow  # ~9 s; the fast set checks the sampler's num_samples in both layouts
@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
def test_decoding_over_a_shared_prefix_equals_per_row_copies(layout):
    """A prompt pass, then three steps of 2 rows per prompt: the logits through
    `share_rows` equal those through a cache holding each row's own copy of its prompt."""
    from jaxpost.models import unstack_layer_params
    cfg = tiny("llama", num_layers=2, vocab_size=64)
    params = init_params(cfg, jax.random.key(0))
    if layout == "per_layer":
        params = unstack_layer_params(params)
    model = Transformer(cfg, layer_params=layout)
    r = np.random.default_rng(2)
    prompts = jnp.asarray(r.integers(1, 64, (2, 6)), jnp.int32)
    seg = jnp.asarray([[1] * 6, [0, 0, 1, 1, 1, 1]], jnp.int32)  # row 1 left-padded
    steps = jnp.asarray(r.integers(1, 64, (4, 3)), jnp.int32)
    apply = jax.jit(lambda tok, sg, cache: model.apply({"params": params}, tok,
                                                       segment_ids=sg, cache=cache))

    def run(cache, share):
        _, cache = apply(prompts, seg, cache)
        if share:
            cache = cache.share_rows(2, 3)
        else:
            rep = lambda x: jnp.repeat(x, 2, axis=1 if layout == "stacked" else 0)  # noqa: E731
            cache = cache.replace(k=jax.tree.map(rep, cache.k), v=jax.tree.map(rep, cache.v),
                                  key_mask=jnp.repeat(cache.key_mask, 2, axis=0))
        outs = []
        for i in range(3):
            logits, cache = apply(steps[:, i:i + 1], jnp.ones((4, 1), jnp.int32), cache)
            outs.append(logits[:, 0])
        return jnp.stack(outs, 1)
    shared = run(KVCache.init(cfg, 2, 6, layer_params=layout), True)
    copies = run(KVCache.init(cfg, 2, 9, layer_params=layout), False)
    chex.assert_tree_all_finite(shared)
    chex.assert_trees_all_close(shared, copies, atol=2e-5, rtol=2e-5)


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
