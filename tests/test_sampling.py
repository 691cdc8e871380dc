"""Sampling: KV-cache decoding against full forward passes (both layer layouts), HF greedy
parity, stop tokens, per-row independence, determinism, compile-once, top-k / top-p,
log-probs, and the sharded sampler."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import sampling
from jaxpost.models import ModelConfig, Transformer, param_shapes, tiny
from jaxpost.sampling import (
    SampleOutput, Sampler, SamplingConfig, generate, sample_logits, top_p_mask)
from jaxpost.sharding import MeshConfig, make_mesh

# A larger init than the default gives peaked next-token distributions: clear argmax
# margins, so greedy comparisons across implementations are not decided by rounding.
CFG = tiny("llama", initializer_range=0.2)
B, P, N = 4, 8, 6
LENGTHS = np.array([8, 3, 5, 1], np.int32)
GREEDY = SamplingConfig(max_new_tokens=N, temperature=0.0)


def _prompts(seed=0, lengths=LENGTHS, width=P, fill=-1):
    """Right-padded random prompts; padding holds `fill` (never a valid id: must be ignored)."""
    rng = np.random.RandomState(seed)
    out = np.full((len(lengths), width), fill, np.int32)
    for b, n in enumerate(lengths):
        out[b, :n] = rng.randint(0, CFG.vocab_size, n)
    return out


@pytest.fixture(scope="module")
def params():
    # Random weights of Transformer(CFG)'s exact tree, drawn with NumPy: `init_params` runs
    # the model eagerly and costs seconds on CPU, this costs milliseconds.
    rng = np.random.RandomState(0)

    def draw(path, shape):
        if path[-1].key == "scale":  # RMSNorm weights: around 1
            return (1 + 0.1 * rng.standard_normal(shape.shape)).astype(np.float32)
        return (CFG.initializer_range * rng.standard_normal(shape.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(CFG))


@pytest.fixture(scope="module")
def sampler():
    return Sampler(CFG)  # shared: every test with the same static settings reuses its jit


@pytest.fixture(scope="module")
def greedy(params, sampler):
    return jax.device_get(sampler(params, _prompts(), LENGTHS, jax.random.key(0), GREEDY))


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, segment_ids):
    return Transformer(cfg).apply({"params": params}, tokens, segment_ids=segment_ids)


def _reference_logits(params, prompts, lengths, generated, cfg=CFG):
    """Logits predicting each generated token, from ONE forward pass over prompt + tokens
    (the plain stacked model, no cache)."""
    rows = [list(prompts[b, :lengths[b]]) + list(generated[b]) for b in range(len(lengths))]
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    segments = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = row
        segments[b, :len(row)] = 1
    logits = np.asarray(_forward(cfg, params, tokens, segments))
    return [logits[b, lengths[b] - 1:lengths[b] - 1 + len(generated[b])] for b in range(len(rows))]


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------------ model-level parity
@pytest.mark.parametrize("unstack", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["unstacked", "stacked"])
def test_kv_cache_decoding_matches_full_forward_at_every_step(params, greedy, unstack):
    prompts = _prompts()
    prefill = jax.jit(lambda p, x, n: sampling._prefill(
        sampling._Runner(CFG, p, unstack), x, n, P + N))
    step = jax.jit(lambda p, t, c: sampling._decode_step(
        sampling._Runner(CFG, p, unstack), t, jnp.ones(t.shape, bool), c))
    logits, cache = prefill(params, prompts, LENGTHS)
    steps, tokens = [], []
    for i in range(N):
        steps.append(np.asarray(logits))
        tokens.append(np.argmax(steps[-1], -1).astype(np.int32))
        if i + 1 < N:
            logits, cache = step(params, tokens[-1], cache)
    cached = np.stack(steps, 1)  # [B, N, V]
    generated = np.stack(tokens, 1)
    ref = _reference_logits(params, prompts, LENGTHS, generated)
    for b in range(B):
        np.testing.assert_allclose(cached[b], ref[b], atol=2e-4, rtol=1e-4)
    # The sampler's decode loop produced exactly these greedy tokens.
    np.testing.assert_array_equal(greedy.tokens, generated)


@pytest.fixture(scope="module")
def stacked_sampler():
    return Sampler(CFG, unstack_layers=False)


@pytest.mark.parametrize("unstack", [True, False], ids=["per_layer", "stacked"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_sampler_logits_equal_the_model_forward_at_every_decode_step(
        params, sampler, stacked_sampler, unstack, temperature):
    # Through the public API: every returned log-prob (and every greedy choice) is the one
    # a plain stacked forward without a cache gives over prompt + sampled tokens.
    run = sampler if unstack else stacked_sampler
    assert run.unstack_layers == unstack
    cfg = GREEDY.replace(temperature=temperature)
    out = jax.device_get(run(params, _prompts(), LENGTHS, jax.random.key(7), cfg))
    assert (out.lengths == N).all()
    ref = _reference_logits(params, _prompts(), LENGTHS, out.tokens)
    for b in range(B):
        logp = _log_softmax(ref[b] / (temperature or 1.0))
        np.testing.assert_allclose(out.logprobs[b], logp[np.arange(N), out.tokens[b]],
                                   atol=2e-4)
        if temperature == 0.0:
            np.testing.assert_array_equal(out.tokens[b], ref[b].argmax(-1))


@pytest.mark.parametrize("unstack", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["per_layer", "stacked"])
def test_sampler_applies_lora_adapters_the_model_applies(params, greedy, unstack):
    # Adapter leaves next to a kernel (stacked under `layers` like every layer param, and
    # on the output head) travel through the per-layer conversion, and the sampler's
    # forward applies them exactly as the model's own forward does.
    if "lora_scale" not in ModelConfig.__dataclass_fields__:
        pytest.skip("models.layers.Linear applies no LoRA adapters yet")
    cfg = CFG.replace(lora_scale=2.0)
    rng = np.random.RandomState(3)
    lora = jax.tree.map(lambda x: x, params)
    targets = [lora["layers"]["self_attn"]["q_proj"], lora["layers"]["self_attn"]["v_proj"],
               lora["lm_head"]]
    for module in targets:
        *lead, d_in, d_out = module["kernel"].shape
        module["lora_a"] = (0.2 * rng.standard_normal((*lead, d_in, 2))).astype(np.float32)
        module["lora_b"] = (0.2 * rng.standard_normal((*lead, 2, d_out))).astype(np.float32)
    out = jax.device_get(Sampler(cfg, unstack_layers=unstack)(
        lora, _prompts(), LENGTHS, jax.random.key(0), GREEDY))
    assert (out.tokens != greedy.tokens).any()  # the adapters change the model
    ref = _reference_logits(lora, _prompts(), LENGTHS, out.tokens, cfg)
    for b in range(B):
        np.testing.assert_array_equal(out.tokens[b], ref[b].argmax(-1))
        np.testing.assert_allclose(
            out.logprobs[b], _log_softmax(ref[b])[np.arange(N), out.tokens[b]], atol=2e-4)


def test_repeated_sampler_calls_with_the_same_shapes_compile_once(params, monkeypatch):
    # Each trace of the jitted sampling program runs `_prefill` and `_decode` once: a
    # second trace (new params values, host or device arrays, other prompts, lengths,
    # keys, temperature, top-p) fails the assertion.
    chex.clear_trace_counter()
    monkeypatch.setattr(sampling, "_prefill", chex.assert_max_traces(sampling._prefill, n=1))
    monkeypatch.setattr(sampling, "_decode", chex.assert_max_traces(sampling._decode, n=1))
    fresh = Sampler(CFG)
    other = jax.device_put(jax.tree.map(lambda x: x * 0.9, params))
    calls = ((params, LENGTHS, 0.0, 1.0), (other, np.array([2, 8, 8, 4], np.int32), 1.0, 0.9),
             (params, LENGTHS, 0.7, 0.5))
    for seed, (p, lengths, temperature, top_p) in enumerate(calls):
        out = fresh(p, _prompts(seed, lengths), lengths, jax.random.key(seed),
                    GREEDY.replace(temperature=temperature, top_p=top_p))
        jax.block_until_ready(out)
    assert len(fresh._compiled) == 1  # one program: the prefill, then the decode loop


def test_the_per_layer_copy_holds_every_kernel_transposed(params):
    # On CPU the sampler's per-call copy stores every projection and the output head as
    # `kernel_t` [out, in] (XLA:CPU streams few-row decode products' weights faster in
    # that layout); the stacked layout passes the params through as they are.
    def kernels(tree, path=()):
        if isinstance(tree, dict):
            for k, v in tree.items():
                yield from kernels(v, path + (k,))
        elif path[-1] in ("kernel", "kernel_t"):
            yield "/".join(path), tree

    per_layer = dict(kernels(sampling._Runner(CFG, params, True).params))
    stacked = dict(kernels(params))
    assert per_layer and all(name.endswith("/kernel_t") for name in per_layer)
    assert per_layer["lm_head/kernel_t"].shape == params["lm_head"]["kernel"].shape[::-1]
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(per_layer["layers_1/self_attn/q_proj/kernel_t"], q[1].T)
    # 7 projections per layer and the head, each once.
    assert len(per_layer) == 7 * CFG.num_layers + 1 == len(stacked) + 7 * (CFG.num_layers - 1)
    assert sampling._Runner(CFG, params, False).params is params


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' params."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


def test_the_stacked_layout_decodes_from_weights_cast_once_to_the_compute_dtype(params):
    # Accelerators run the stacked layout. With float32 master weights and bfloat16
    # compute the params are cast once per call, so no float32 weight enters the decode
    # loop: the scanned layers would otherwise slice and convert the float32 stack at
    # every step, reading 4 bytes a weight where 2 do (decode is bound by that reading).
    cfg = CFG.replace(dtype="bfloat16")
    jaxpr = jax.make_jaxpr(lambda p: generate(cfg, p, _prompts(), LENGTHS, jax.random.key(0),
                                              GREEDY, unstack_layers=False))(params)
    weights = {x.shape for x in jax.tree.leaves(params) if x.ndim >= 2}
    loops = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "while"]
    entering = [v.aval.dtype for e in loops for v in e.invars
                if getattr(v.aval, "shape", None) in weights
                and jnp.issubdtype(v.aval.dtype, jnp.floating)]
    assert loops and len(entering) >= len(jax.tree.leaves(params["layers"])), entering
    assert set(entering) == {jnp.dtype(jnp.bfloat16)}, entering


def _sampler_temp_bytes(cfg, unstack: bool) -> int:
    """The compiled sampler's temporaries (bytes), batch 4, 8-token prompts, 8 new tokens."""
    static = sampling._static_args(cfg, SamplingConfig(max_new_tokens=8, temperature=1.0))
    fn = functools.partial(sampling._generate, cfg, static=static, num_samples=1,
                           unstack=unstack, mesh=None, rules=sampling.shd.DEFAULT_RULES)
    compiled = jax.jit(fn).lower(
        param_shapes(cfg), jax.ShapeDtypeStruct((4, 8), jnp.int32),
        jax.ShapeDtypeStruct((4,), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)),
        jnp.float32(1.0), jnp.float32(1.0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_the_transposed_kernels_cost_at_most_one_copy_of_the_kernels(monkeypatch):
    # The per-layer copy's `kernel_t` leaves are read by the prefill and by the decode
    # loop; XLA once gave each its own transposing copy (temporaries ~1.4x the kernels
    # above the plain per-layer slices). Against the same program on plain slices, the
    # transposed kernels may add at most one copy of every kernel, the head's included.
    cfg = tiny("llama", vocab_size=4096, hidden_size=256, intermediate_size=768, head_dim=64)
    kernel_bytes = sum(x.size * x.dtype.itemsize for path, x in
                       jax.tree_util.tree_leaves_with_path(param_shapes(cfg))
                       if jax.tree_util.keystr(path).endswith("['kernel']"))
    transposed = _sampler_temp_bytes(cfg, True)
    monkeypatch.setattr(sampling, "_kernels_out_in", lambda params, dtype: params)
    plain = _sampler_temp_bytes(cfg, True)
    assert plain < transposed <= plain + kernel_bytes, (plain, transposed, kernel_bytes)


@pytest.mark.parametrize("unstack", [True, False], ids=["unstacked", "stacked"])
def test_a_sampler_call_copies_the_layer_weights_at_most_once(params, monkeypatch, unstack):
    # With unstack_layers, the stacked weights are sliced into per-layer arrays once per
    # call, a temporary that the prefill and every decode step read (a prefill and a
    # decode jitted apart sliced them twice: ~7% of W-GEN on CPU); the stacked layout
    # copies nothing. Outputs are those of `generate`, the same body run eagerly.
    traced = []
    real = sampling.unstack_layer_params
    monkeypatch.setattr(sampling, "unstack_layer_params",
                        lambda *a, **k: traced.append(1) or real(*a, **k))
    cfg = SamplingConfig(max_new_tokens=N, temperature=1.0, num_samples=2)
    out = Sampler(CFG, unstack_layers=unstack)(params, _prompts(), LENGTHS,
                                              jax.random.key(3), cfg)
    assert len(traced) == int(unstack)
    want = generate(CFG, params, _prompts(), LENGTHS, jax.random.key(3), cfg,
                    unstack_layers=unstack)
    out, want = jax.device_get(out), jax.device_get(want)
    for name in ("tokens", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(out, name), getattr(want, name), err_msg=name)
    chex.assert_trees_all_close(out.logprobs, want.logprobs, atol=1e-5)  # fusion rounding


def test_greedy_matches_transformers_generate(params, greedy, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxpost.models import to_hf

    to_hf(CFG, params, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    model.eval()
    prompts = _prompts()
    ids = np.zeros((B, P), np.int64)
    mask = np.zeros((B, P), np.int64)
    for b, n in enumerate(LENGTHS):  # HF batches left-padded prompts with an attention mask
        ids[b, P - n:] = prompts[b, :n]
        mask[b, P - n:] = 1
    assert not CFG.eos_token_ids  # no EOS: both sides generate all N tokens
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             do_sample=False, max_new_tokens=N, min_new_tokens=N, pad_token_id=0)
    np.testing.assert_array_equal(out[:, P:].numpy(), greedy.tokens)


# ------------------------------------------------------------------------ batching
def test_row_output_does_not_depend_on_other_rows(params, sampler, greedy):
    # Same shapes, other rows changed (content and lengths): row 0 is unchanged, sampled
    # rows included (each row draws its own uniform number per step).
    lengths = np.array([8, 7, 2, 4], np.int32)
    other = _prompts(seed=5, lengths=lengths)
    other[0] = _prompts()[0]
    out = sampler(params, other, lengths, jax.random.key(0), GREEDY)
    np.testing.assert_array_equal(out.tokens[0], greedy.tokens[0])
    np.testing.assert_allclose(out.logprobs[0], greedy.logprobs[0], atol=1e-5)
    cfg = GREEDY.replace(temperature=1.0)
    a = sampler(params, _prompts(), LENGTHS, jax.random.key(9), cfg)
    b = sampler(params, other, lengths, jax.random.key(9), cfg)
    np.testing.assert_array_equal(a.tokens[0], b.tokens[0])


@pytest.mark.slow
def test_row_output_does_not_depend_on_padding_width(params, sampler, greedy):
    wide = _prompts(width=P + 4, fill=7)  # four more padding columns in every row
    out = sampler(params, wide, LENGTHS, jax.random.key(0), GREEDY)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(out.logprobs, greedy.logprobs, atol=1e-5)


def _first_hit(row, ids):
    hits = [i for i, t in enumerate(row) if t in ids]
    return hits[0] if hits else None


def test_eos_and_stop_tokens_end_only_their_rows(params, sampler, greedy):
    g = greedy.tokens
    # EOS: a token row 1 emits at step >= 1 (not before); stop: the same for row 2.
    eos = next(int(t) for i, t in enumerate(g[1]) if i >= 1 and t not in g[1, :i])
    stop = next(int(t) for i, t in enumerate(g[2]) if i >= 1 and t not in g[2, :i] and t != eos)
    cfg = GREEDY.replace(eos_ids=(eos,), stop_ids=(stop,), pad_id=-1)
    out = jax.device_get(sampler(params, _prompts(), LENGTHS, jax.random.key(0), cfg))
    assert _first_hit(g[1], {eos, stop}) is not None and _first_hit(g[2], {eos, stop}) is not None
    assert any(_first_hit(g[b], {eos, stop}) is None for b in range(B)), "no row runs to the end"
    for b in range(B):
        hit = _first_hit(g[b], {eos, stop})
        n = N if hit is None else hit + 1  # the stop token counts and is kept
        assert out.lengths[b] == n
        assert out.truncated[b] == (hit is None)
        np.testing.assert_array_equal(out.tokens[b, :n], g[b, :n])
        np.testing.assert_array_equal(out.tokens[b, n:], -1)
        np.testing.assert_allclose(out.logprobs[b, :n], greedy.logprobs[b, :n], atol=1e-5)
        np.testing.assert_array_equal(out.logprobs[b, n:], 0.0)


def test_single_new_token(params, sampler, greedy):
    cfg = SamplingConfig(max_new_tokens=1, temperature=0.0, eos_ids=(int(greedy.tokens[0, 0]),))
    out = jax.device_get(sampler(params, _prompts(), LENGTHS, jax.random.key(0), cfg))
    assert out.tokens.shape == (B, 1) and out.logprobs.shape == (B, 1)
    np.testing.assert_array_equal(out.tokens[:, 0], greedy.tokens[:, 0])
    np.testing.assert_array_equal(out.lengths, np.ones(B))
    np.testing.assert_array_equal(out.truncated, greedy.tokens[:, 0] != greedy.tokens[0, 0])


# --------------------------------------------------------------------- randomness
def test_same_rng_same_output_and_new_rng_new_output(params, sampler):
    cfg = GREEDY.replace(temperature=1.0)
    a = sampler(params, _prompts(), LENGTHS, jax.random.key(1), cfg)
    b = sampler(params, _prompts(), LENGTHS, jax.random.key(1), cfg)
    c = sampler(params, _prompts(), LENGTHS, jax.random.key(2), cfg)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


def test_temperature_and_top_p_changes_do_not_recompile(params, sampler, greedy):
    before = dict(sampler._compiled)
    for t, p in ((0.0, 1.0), (1.0, 1.0), (0.7, 0.9), (1.3, 0.5)):
        sampler(params, _prompts(), LENGTHS, jax.random.key(0),
                GREEDY.replace(temperature=t, top_p=p))
    assert sampler._compiled.keys() == before.keys() and len(before) >= 1
    for fn in sampler._compiled.values():
        assert fn._cache_size() == 1


def test_top_k_1_equals_greedy(params, sampler, greedy):
    cfg = GREEDY.replace(temperature=1.0, top_k=1)
    out = sampler(params, _prompts(), LENGTHS, jax.random.key(3), cfg)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    # At temperature 1 the untruncated log-probs are the greedy (raw) ones.
    np.testing.assert_allclose(out.logprobs, greedy.logprobs, atol=1e-5)


def test_logprobs_are_temperature_scaled_log_softmax_of_a_full_forward(params, sampler):
    temperature, top_p = 0.7, 0.9
    cfg = GREEDY.replace(temperature=temperature, top_p=top_p)
    out = jax.device_get(sampler(params, _prompts(), LENGTHS, jax.random.key(4), cfg))
    assert (out.lengths == N).all()
    ref = _reference_logits(params, _prompts(), LENGTHS, out.tokens)
    for b in range(B):
        logp = _log_softmax(ref[b] / temperature)
        expected = logp[np.arange(N), out.tokens[b]]
        np.testing.assert_allclose(out.logprobs[b], expected, atol=2e-4)
        # ...and each token was drawn from inside the nucleus.
        keep = np.asarray(top_p_mask(ref[b] / temperature, top_p))
        assert keep[np.arange(N), out.tokens[b]].all()


# ------------------------------------------------------------------ token choice
def _numpy_top_p(logits, p):
    probs = np.exp(_log_softmax(logits))
    keep = np.zeros(logits.shape, bool)
    for r in range(len(logits)):
        order = np.argsort(-probs[r])
        cum = np.cumsum(probs[r, order])
        count = int(np.searchsorted(cum, p)) + 1  # smallest prefix with mass >= p
        keep[r, order[:count]] = True
    return keep


_top_p = jax.jit(top_p_mask)
_sample = jax.jit(sample_logits, static_argnames="top_k")


def test_top_p_keeps_the_smallest_set_with_enough_mass():
    logits = np.random.RandomState(0).normal(size=(6, 50)).astype(np.float32) * 3
    where = logits >= np.sort(logits, -1)[:, -10:-9]  # a top-10 candidate set
    restricted = np.where(where, logits, -np.inf)
    for p in (0.05, 0.3, 0.5, 0.9, 0.99):
        np.testing.assert_array_equal(_top_p(logits, p, None), _numpy_top_p(logits, p))
        # Relative to a candidate set (top-p after top-k): mass renormalised over the set.
        np.testing.assert_array_equal(_top_p(logits, p, where), _numpy_top_p(restricted, p))
    assert np.asarray(_top_p(logits, 1.0, None)).all()


VOCAB, ROWS = 300, 20000  # 300: not a multiple of the inverse-CDF block


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (10, 0.8)])
def test_sample_logits_draws_from_the_filtered_distribution(top_k, top_p):
    temperature = 0.8
    logits = np.random.RandomState(1).normal(size=VOCAB).astype(np.float32) * 2
    tokens, logprobs = _sample(jnp.broadcast_to(logits, (ROWS, VOCAB)), jax.random.key(0),
                               temperature, top_k, top_p)
    scaled = logits / temperature
    expected = np.exp(_log_softmax(scaled))
    np.testing.assert_allclose(logprobs, np.log(expected)[tokens], atol=1e-5)
    keep = np.ones(VOCAB, bool)
    if top_k:
        keep = scaled >= np.sort(scaled)[-top_k]
    keep &= _numpy_top_p(np.where(keep, scaled, -np.inf)[None], top_p)[0]
    expected = np.where(keep, expected, 0) / expected[keep].sum()
    freq = np.bincount(np.asarray(tokens), minlength=VOCAB) / ROWS
    assert freq[~keep].sum() == 0
    np.testing.assert_allclose(freq, expected, atol=0.012)


def test_temperature_zero_is_argmax_with_raw_logprob():
    logits = np.random.RandomState(2).normal(size=(ROWS, VOCAB)).astype(np.float32)
    tokens, logprobs = _sample(logits, jax.random.key(0), 0.0, 0, 1.0)  # same jit as above
    best = logits.argmax(-1)
    np.testing.assert_array_equal(tokens, best)
    np.testing.assert_allclose(logprobs, _log_softmax(logits)[np.arange(ROWS), best], atol=1e-5)


# ------------------------------------------------------------------- API surface
def test_invalid_settings_and_inputs_raise_clear_errors(params, sampler):
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)
    with pytest.raises(ValueError, match=r"prompt_lengths\[1\]=0"):
        sampler(params, _prompts(), np.array([8, 0, 5, 1]), jax.random.key(0), GREEDY)
    with pytest.raises(ValueError, match=r"prompt_lengths\[0\]=9 is outside \[1, 8\]"):
        sampler(params, _prompts(), np.array([9, 3, 5, 1]), jax.random.key(0), GREEDY)
    with pytest.raises(ValueError, match="shape"):
        sampler(params, _prompts(), LENGTHS[:2], jax.random.key(0), GREEDY)
    assert SamplingConfig(eos_ids=[3, 4]).eos_ids == (3, 4)
    assert SamplingConfig(stop_ids=(9,)).stop_tokens(CFG.replace(eos_token_ids=(2,))) == (2, 9)
    assert SamplingConfig(eos_ids=()).stop_tokens(CFG.replace(eos_token_ids=(2,))) == ()


@pytest.mark.slow
def test_jitted_generate_with_stacked_layers_equals_sampler(params, greedy):
    fn = jax.jit(lambda p, x, n, k: generate(CFG, p, x, n, k, GREEDY, unstack_layers=False))
    out = fn(params, _prompts(), LENGTHS, jax.random.key(0))
    assert isinstance(out, SampleOutput)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(out.logprobs, greedy.logprobs, atol=1e-5)


@pytest.mark.slow
def test_sharded_sampler_equals_single_device(params, greedy):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    out = Sampler(CFG, mesh)(params, _prompts(), LENGTHS, jax.random.key(0), GREEDY)
    assert len(out.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(out.logprobs, greedy.logprobs, atol=1e-4)
    np.testing.assert_array_equal(out.lengths, greedy.lengths)


# ------------------------------------------------------------------- num_samples
@pytest.mark.parametrize("unstack", [True, False])
def test_num_samples_equals_sampling_the_repeated_prompts(params, unstack):
    """n completions per prompt from one prefill: the same tokens, log-probs and lengths
    as sampling each prompt's n copies (same rng), prompt-major rows, both cache layouts."""
    n = 3
    cfg = GREEDY.replace(temperature=1.0, eos_ids=(5,))
    sampler = Sampler(CFG, unstack_layers=unstack)
    shared = jax.device_get(sampler(params, _prompts(), LENGTHS, jax.random.key(4),
                                    cfg.replace(num_samples=n)))
    repeated = jax.device_get(sampler(params, np.repeat(_prompts(), n, 0),
                                      np.repeat(LENGTHS, n), jax.random.key(4), cfg))
    chex.assert_shape(shared.tokens, (B * n, N))
    np.testing.assert_array_equal(shared.tokens, repeated.tokens)
    np.testing.assert_array_equal(shared.lengths, repeated.lengths)
    np.testing.assert_allclose(shared.logprobs, repeated.logprobs, atol=1e-5)
    # rows of one prompt differ from each other (independent draws)
    assert len({tuple(r) for r in shared.tokens[:n]}) > 1


def test_num_samples_must_be_a_positive_int():
    with pytest.raises(ValueError, match="num_samples=0"):
        SamplingConfig(num_samples=0)
