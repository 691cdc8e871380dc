"""Autoregressive sampling: a prefill, then one decode loop over a KV cache, in one jit.

Prompts come in the natural user format, a right-padded int32 array `[B, P]` plus the
length of each row; they are left-aligned inside `jit` (the cache writes every row at
the same slots, see `jaxpost.models.KVCache`), so every row's last prompt token sits at
slot `P - 1` and every row decodes in lock step. The cache holds `P + max_new_tokens`
slots. The decode loop is one `lax.while_loop`: no host round trip per token, static
shapes, and it stops as soon as every row has emitted an EOS or stop token.

Per step: temperature scaling, optional top-k (static `k`), optional nucleus (top-p)
filtering, then one draw. Temperature 0 means greedy (argmax). Temperature and top-p are
traced values, so changing them does not recompile.

Log-probabilities: `SampleOutput.logprobs[b, t]` is the log-probability of the sampled
token under the temperature-scaled distribution `log_softmax(logits / temperature)`,
taken BEFORE top-k/top-p truncation (under greedy decoding: the raw `log_softmax(logits)`),
and 0 after the end of a sequence. This is the quantity GRPO uses as the old-policy
log-prob: its policy loss recomputes `log_softmax(logits / temperature)` from a full
forward pass (TRL scales logits by the sampling temperature in the same way), and a
truncated distribution would give a log-prob no forward pass can reproduce.

Sampling draws one uniform number per row and inverts the CDF in two levels (blocks of
128 tokens, then within a block) instead of adding Gumbel noise to the whole vocabulary:
on CPU that is ~8x cheaper per step for a 16k vocabulary. Top-p finds its probability
threshold by bisection on the float bits rather than sorting the vocabulary (a sort of
`[16, 16384]` costs more than a whole decode step on CPU); ties at the threshold are all
kept.

Prefill and decode steps are `Transformer(cfg).apply` with the KV cache, the model's own
forward pass and nothing else, so whatever the model applies (LoRA adapters, ...) applies
to sampling too. On CPU the sampler runs the model in its "per_layer" layout (per-layer
weight copies made once per call; see `Sampler`'s `unstack_layers`).

Entry points: `Sampler` (compiled once per shape, sharded: what training loops use),
`generate` (the same as one pure function, to call inside your own `jit`), and the
token-choice pieces `sample_logits` and `top_p_mask`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpost import sharding as shd
from jaxpost.models.attention import KVCache
from jaxpost.models.config import ModelConfig
from jaxpost.models.layers import constrain, kernel_out_in
from jaxpost.models.transformer import Transformer, cast_floating, unstack_layer_params
from jaxpost.platform import platform

_CDF_BLOCK = 128  # vocabulary block of the two-level inverse-CDF draw


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample completions.

    `max_new_tokens`, `top_k`, the stop ids and `pad_id` fix the compiled program;
    `temperature` and `top_p` are passed as traced values (changing them never recompiles).
    """

    max_new_tokens: int = 64  # completion length budget (static: sets the output shape)
    temperature: float = 1.0  # logits are divided by it; 0 means greedy decoding
    top_k: int = 0  # keep the k most likely tokens before drawing; 0 (or >= vocab): off
    top_p: float = 1.0  # nucleus sampling: smallest set with probability mass >= top_p
    eos_ids: tuple[int, ...] | None = None  # None: the model config's eos_token_ids
    stop_ids: tuple[int, ...] = ()  # extra tokens that end a sequence (and are kept)
    pad_id: int = 0  # written to `tokens` after a sequence has ended
    # Completions per prompt (vLLM's `n`): output rows i*n .. i*n+n-1 continue prompt i,
    # whose prefill runs once and whose cached keys and values the n rows share, held
    # once per prompt (`KVCache.share_rows`; GRPO's groups).
    num_samples: int = 1

    def __post_init__(self):
        for name in ("eos_ids", "stop_ids"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (int, np.integer)):
                    value = (value,)
                object.__setattr__(self, name, tuple(int(v) for v in value))
        if not isinstance(self.num_samples, (int, np.integer)) or self.num_samples < 1:
            raise ValueError(
                f"SamplingConfig.num_samples={self.num_samples!r}: must be an int >= 1")
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingConfig.max_new_tokens={self.max_new_tokens!r}: must be an int >= 1")
        if not self.temperature >= 0:
            raise ValueError(
                f"SamplingConfig.temperature={self.temperature!r}: must be >= 0 (0 = greedy)")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k={self.top_k!r}: must be an int >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p={self.top_p!r}: must be in (0, 1] (1 = off)")

    def replace(self, **changes: Any) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)

    def stop_tokens(self, model_cfg: ModelConfig) -> tuple[int, ...]:
        """All token ids that end a sequence: EOS ids (or the model's) plus stop ids."""
        eos = model_cfg.eos_token_ids if self.eos_ids is None else self.eos_ids
        return tuple(sorted(set(eos) | set(self.stop_ids)))


@flax.struct.dataclass
class SampleOutput:
    """Sampled completions; positions after a sequence's end hold `pad_id` and 0."""

    tokens: jax.Array  # int32 [B, max_new_tokens]
    logprobs: jax.Array  # float32 [B, max_new_tokens]: log p(token) under logits/temperature
    lengths: jax.Array  # int32 [B]: generated tokens, the final EOS/stop token included
    truncated: jax.Array  # bool [B]: no EOS/stop token within max_new_tokens


# --------------------------------------------------------------------- token choice
def top_p_mask(logits: jax.Array, top_p: jax.Array | float,
               where: jax.Array | None = None) -> jax.Array:
    """Nucleus filter: the smallest set of most likely tokens with probability >= top_p.

    Args:
      logits: float [..., V].
      top_p: scalar in (0, 1].
      where: optional bool [..., V]; only these tokens are candidates and the mass is
        taken relative to them (top-p after top-k).

    Returns:
      bool [..., V]: True for kept tokens. Tokens tied with the least likely kept one are
      kept too. Found by bisection over the float32 bit patterns of the probabilities,
      which is exact and needs no sort.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if where is not None:
        logits = jnp.where(where, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    # Positive float32 values order like their int32 bit patterns.
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    target = jnp.asarray(top_p, jnp.float32) * jnp.sum(probs, axis=-1, keepdims=True)
    shape = probs.shape[:-1] + (1,)
    lo = jnp.zeros(shape, jnp.int32)  # invariant: mass(probs >= lo) >= target
    hi = jnp.full(shape, 0x3F800001, jnp.int32)  # just above 1.0: mass(probs >= hi) = 0

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        mass = jnp.sum(jnp.where(bits >= mid, probs, 0.0), axis=-1, keepdims=True)
        ok = mass >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, halve, (lo, hi))
    keep = bits >= jnp.maximum(lo, 1)  # never keep zero-probability tokens...
    # ...unless rounding left nothing: then the most likely token alone.
    best = jax.nn.one_hot(jnp.argmax(probs, axis=-1), probs.shape[-1], dtype=bool)
    return jnp.where(jnp.any(keep, axis=-1, keepdims=True), keep, best)


def _search(cum: jax.Array, weights: jax.Array, x: jax.Array) -> jax.Array:
    """Index of the first entry with cum > x, clamped to the last positive weight."""
    n = cum.shape[-1]
    idx = jnp.sum(cum <= x[:, None], axis=-1, dtype=jnp.int32)
    last = n - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1).astype(jnp.int32)
    return jnp.minimum(idx, last)


def _draw(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Token index per row with probability proportional to `weights` [B, V] (>= 0, not
    all 0), by inverting the CDF at `u * total` ([B] uniforms in [0, 1)) in two levels."""
    b, v = weights.shape
    block = min(_CDF_BLOCK, v)
    nb = -(-v // block)
    if nb * block != v:
        weights = jnp.pad(weights, ((0, 0), (0, nb * block - v)))
    blocks = weights.reshape(b, nb, block)
    sums = jnp.sum(blocks, axis=-1)  # [B, nb]
    csum = jnp.cumsum(sums, axis=-1)
    x = u * csum[:, -1]
    bi = _search(csum, sums, x)
    below = jnp.take_along_axis(csum - sums, bi[:, None], axis=1)[:, 0]
    inner = jnp.take_along_axis(blocks, bi[:, None, None], axis=1)[:, 0]  # [B, block]
    ji = _search(jnp.cumsum(inner, axis=-1), inner, jnp.maximum(x - below, 0.0))
    return bi * block + ji


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: jax.Array | float = 1.0,
                  top_k: int = 0, top_p: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row.

    Args:
      logits: float [B, V].
      rng: a PRNG key.
      temperature: scalar (traced is fine); <= 0 means greedy (argmax).
      top_k: static; keep the k largest logits (ties included); 0 or >= V: off.
      top_p: scalar (traced is fine) in (0, 1]; nucleus filter after top-k; 1: off.

    Returns:
      (tokens int32 [B], logprobs float32 [B]): the log-probability of each token under
      `log_softmax(logits / temperature)` before any truncation (raw logits if greedy).
    """
    logits = jnp.asarray(logits, jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)
    vocab = logits.shape[-1]

    def greedy(logits):
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        return tok, jnp.take_along_axis(logits, tok[:, None], axis=1)[:, 0] - lse

    def sample(logits):
        scaled = logits / temperature
        lse = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
        probs = jnp.exp(scaled - lse)
        keep = None
        if 0 < top_k < vocab:
            # min of the top k, not [..., -1]: XLA:CPU turns a sliced top_k into a full sort.
            kth = jnp.min(jax.lax.top_k(scaled, top_k)[0], axis=-1, keepdims=True)
            keep = scaled >= kth
            probs = jnp.where(keep, probs, 0.0)
        probs = jax.lax.cond(
            top_p < 1.0,
            lambda p: jnp.where(top_p_mask(scaled, top_p, keep), p, 0.0),
            lambda p: p, probs)
        u = jax.random.uniform(rng, (logits.shape[0],), jnp.float32)
        tok = _draw(probs, u).astype(jnp.int32)
        return tok, jnp.take_along_axis(scaled - lse, tok[:, None], axis=1)[:, 0]

    return jax.lax.cond(temperature <= 0.0, greedy, sample, logits)


# ------------------------------------------------------------------- model steps
def left_pad(prompts: jax.Array, prompt_lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Right-padded prompts [B, P] -> left-padded tokens and segment ids (0 = padding).

    Padding slots get token 0 (any id is safe: it is masked out), so the caller's padding
    value never reaches the embedding lookup.
    """
    p = prompts.shape[1]
    lengths = jnp.clip(prompt_lengths.astype(jnp.int32), 0, p)
    src = jnp.arange(p, dtype=jnp.int32)[None, :] - (p - lengths)[:, None]
    valid = src >= 0
    tokens = jnp.take_along_axis(prompts.astype(jnp.int32), jnp.maximum(src, 0), axis=1)
    return jnp.where(valid, tokens, 0), valid.astype(jnp.int32)


def _layout(unstack: bool) -> str:
    return "per_layer" if unstack else "stacked"


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)


def _kernels_out_in(params, dtype):
    """Every `Linear`'s kernel (a dict holding `kernel`) as its transpose `kernel_t` [out,
    in], cast to `dtype`: the layout XLA:CPU streams fastest in the decode's few-row
    matmuls (the output head's [16, 512] x [512, 16384] at ~4.2 GB/s of weights against
    ~1.9 on [in, out]; a W-GEN call ~15% faster), and torch's own (`x @ weight.T`)."""
    if isinstance(params, dict) and "kernel" in params:
        return kernel_out_in(params, dtype)
    if isinstance(params, dict):
        return {k: _kernels_out_in(v, dtype) for k, v in params.items()}
    return params


class _Runner:
    """`Transformer(cfg)` as the sampler runs it, inside `jit`: the model's own module.

    With `unstack`, the model runs in its "per_layer" layout: the stacked layer
    parameters are sliced into per-layer subtrees once per call (`unstack_layer_params`,
    cast to the compute dtype) and the cache keeps one buffer per layer. This is for
    XLA:CPU, which copies every layer's weights out of the stack at every decode step when
    the layers are scanned (about 20% of a tiny-llama step). The same per-call copy stores
    every kernel, the output head's too, as its transpose (`_kernels_out_in`).

    Without `unstack` (accelerators) the stacked model runs on the params cast to the
    compute dtype once per call (`cast_floating`; no copy when they are in it already):
    with float32 master weights and bfloat16 compute, the decode steps, which are bound by
    reading the weights, read 2 bytes a weight instead of 4 (the scanned layers would
    otherwise slice and convert the float32 stack at every step).
    """

    def __init__(self, cfg: ModelConfig, params, unstack: bool):
        self.cfg, self.unstack = cfg, unstack
        self.model = Transformer(cfg, layer_params=_layout(unstack))
        if unstack:
            self.params = _kernels_out_in(unstack_layer_params(params, cfg.dtype), cfg.dtype)
        else:
            self.params = cast_floating(params, cfg.dtype)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache of `max_len` slots per row, in this runner's layout."""
        return self.constrain(KVCache.init(self.cfg, batch, max_len,
                                           layer_params=_layout(self.unstack)))

    def constrain(self, cache: KVCache) -> KVCache:
        """`cache` constrained to its logical axes (with a shared prefix if it has one)."""
        axes = KVCache.logical_axes(_layout(self.unstack), self.cfg.num_layers,
                                    shared_prefix=cache.prefix_k is not None)
        return jax.tree.map(lambda names, x: constrain(x, names) if names else x,
                            axes, cache, is_leaf=_is_names)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array, cache: KVCache,
                 last_only: bool = False) -> tuple[jax.Array, KVCache]:
        """Writes `tokens` [B, T] to the cache; logits [B, T, V] (or [B, V] of the last)."""
        logits, cache = self.model.apply({"params": self.params}, tokens,
                                         segment_ids=segment_ids, cache=cache,
                                         last_only=last_only)
        return logits, self.constrain(cache)


def _prefill(runner: _Runner, prompts: jax.Array, prompt_lengths: jax.Array,
             max_len: int, num_samples: int = 1) -> tuple[jax.Array, KVCache]:
    """Prompts (right-padded) -> logits [B * n, V] of the token after each prompt, and the
    cache (index P), each prompt's row repeated `num_samples` (n) times after its one
    prefill: the n rows share the prompt's P slots (`KVCache.share_rows`), so the decode
    steps read each prompt's keys once, not n times. Left padding puts every row's last
    prompt token at P - 1."""
    tokens, segment_ids = left_pad(prompts, prompt_lengths)
    p = prompts.shape[1]
    cache = runner.init_cache(prompts.shape[0], p if num_samples > 1 else max_len)
    logits, cache = runner(tokens, segment_ids, cache, last_only=True)
    if num_samples > 1:
        logits = jnp.repeat(logits, num_samples, axis=0)
        cache = runner.constrain(cache.share_rows(num_samples, max_len - p))
    return logits, cache


def _decode_step(runner: _Runner, tokens: jax.Array, active: jax.Array,
                 cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One token per row -> next-token logits [B, V]; inactive rows are cached as padding."""
    return runner(jnp.where(active, tokens, 0)[:, None], active.astype(jnp.int32)[:, None],
                  cache, last_only=True)


class _LoopState(NamedTuple):
    step: jax.Array  # int32: index of the token sampled next
    cache: KVCache
    logits: jax.Array  # float32 [B, V]: next-token logits of every row
    done: jax.Array  # bool [B]: the row has emitted a stop token
    tokens: jax.Array  # int32 [B, N]
    logprobs: jax.Array  # float32 [B, N]
    lengths: jax.Array  # int32 [B]


def _decode(runner: _Runner, logits: jax.Array, cache: KVCache, rng: jax.Array,
            temperature: jax.Array, top_p: jax.Array, *, max_new_tokens: int, top_k: int,
            stop_ids: tuple[int, ...], pad_id: int) -> tuple[SampleOutput, KVCache]:
    """The decode loop: sample from `logits`, feed the token back, repeat.

    One `lax.while_loop` that stops once every row has emitted one of `stop_ids`; it
    runs at most `max_new_tokens - 1` forward steps. Step t draws with
    `jax.random.fold_in(rng, t)`.
    """
    b = logits.shape[0]
    stops = jnp.asarray(stop_ids, jnp.int32)

    def cond(state: _LoopState):
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    def body(state: _LoopState) -> _LoopState:
        tok, lp = sample_logits(state.logits, jax.random.fold_in(rng, state.step),
                                temperature, top_k, top_p)
        alive = ~state.done
        done = state.done
        if stop_ids:
            done = done | jnp.any(tok[:, None] == stops[None, :], axis=-1)
        step = state.step + 1
        # The forward pass for the next step, skipped after the last token.
        logits, cache = jax.lax.cond(
            step < max_new_tokens,
            lambda c: _decode_step(runner, tok, ~done, c),
            lambda c: (state.logits, c), state.cache)
        col = (0, state.step)
        return _LoopState(
            step=step, cache=cache, logits=logits, done=done,
            tokens=jax.lax.dynamic_update_slice(
                state.tokens, jnp.where(alive, tok, pad_id)[:, None], col),
            logprobs=jax.lax.dynamic_update_slice(
                state.logprobs, jnp.where(alive, lp, 0.0)[:, None], col),
            lengths=state.lengths + alive.astype(jnp.int32))

    state = _LoopState(
        step=jnp.zeros((), jnp.int32), cache=cache, logits=logits.astype(jnp.float32),
        done=jnp.zeros((b,), bool),
        tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
        lengths=jnp.zeros((b,), jnp.int32))
    state = jax.lax.while_loop(cond, body, state)
    out = SampleOutput(tokens=state.tokens, logprobs=state.logprobs, lengths=state.lengths,
                       truncated=~state.done)
    return out, state.cache


# ---------------------------------------------------------------------- front ends
def _check_inputs(prompts, prompt_lengths) -> None:
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be int [batch, prompt_len], got shape {prompts.shape}")
    if prompt_lengths.shape != prompts.shape[:1]:
        raise ValueError(
            f"prompt_lengths must have shape [batch]={prompts.shape[:1]}, got "
            f"{prompt_lengths.shape}")
    for name, x in (("prompts", prompts), ("prompt_lengths", prompt_lengths)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got dtype {x.dtype}")
    if isinstance(prompt_lengths, jax.core.Tracer):
        return
    lengths = shd.local_rows(prompt_lengths)  # multi-host: this process's rows
    bad = np.flatnonzero((lengths < 1) | (lengths > prompts.shape[1]))
    if bad.size:
        raise ValueError(
            f"prompt_lengths[{bad[0]}]={lengths[bad[0]]} is outside [1, {prompts.shape[1]}]: "
            f"prompts is right-padded to {prompts.shape[1]} columns and empty prompts are "
            "not supported")


def _static_args(model_cfg: ModelConfig, cfg: SamplingConfig) -> dict[str, Any]:
    top_k = int(cfg.top_k) if cfg.top_k < model_cfg.vocab_size else 0
    return dict(max_new_tokens=int(cfg.max_new_tokens), top_k=top_k,
                stop_ids=cfg.stop_tokens(model_cfg), pad_id=int(cfg.pad_id))


def _default_unstack(mesh: Mesh | None) -> bool:
    return platform(mesh) == "cpu"


def _rules(mesh: Mesh | None, rules):
    return contextlib.nullcontext() if mesh is None else shd.logical_rules(mesh, rules)


def generate(model_cfg: ModelConfig, params, prompts: jax.Array, prompt_lengths: jax.Array,
             rng: jax.Array, cfg: SamplingConfig = SamplingConfig(), *,
             mesh: Mesh | None = None, rules=shd.DEFAULT_RULES,
             unstack_layers: bool | None = None) -> SampleOutput:
    """Samples completions; a pure function of its arguments, usable inside `jax.jit`.

    For repeated calls prefer `Sampler`, which jits this same body once per shape and
    places inputs on the mesh.

    Args:
      model_cfg: the model's config.
      params: its parameters.
      prompts: int [B, P], right-padded (any padding value).
      prompt_lengths: int [B], each in [1, P] (checked when not traced).
      rng: a PRNG key; the same key gives the same output.
      cfg: sampling settings.
      mesh: when set, activations are constrained with `rules` on this mesh.
      rules: logical-axis rules (see `jaxpost.sharding`).
      unstack_layers: run the layers unrolled from per-layer copies of the weights (see
        `Sampler`); default: on CPU only.

    Returns:
      A `SampleOutput`.
    """
    prompts = jnp.asarray(prompts)
    prompt_lengths = jnp.asarray(prompt_lengths)
    _check_inputs(prompts, prompt_lengths)
    if unstack_layers is None:
        unstack_layers = _default_unstack(mesh)
    return _generate(model_cfg, params, prompts, prompt_lengths, rng,
                     jnp.float32(cfg.temperature), jnp.float32(cfg.top_p),
                     static=_static_args(model_cfg, cfg), num_samples=cfg.num_samples,
                     unstack=unstack_layers, mesh=mesh, rules=rules)


def _generate(model_cfg: ModelConfig, params, prompts, prompt_lengths, rng, temperature,
              top_p, *, static: dict[str, Any], num_samples: int, unstack: bool,
              mesh: Mesh | None, rules) -> SampleOutput:
    """Prefill, then the decode loop, inside the program that traces it (`generate`'s
    caller, or the Sampler's jit): with `unstack`, the one per-layer copy of the weights
    is a temporary of that program, read by the prefill and by every decode step."""
    with _rules(mesh, rules):
        runner = _Runner(model_cfg, params, unstack)
        logits, cache = _prefill(runner, prompts, prompt_lengths,
                                 prompts.shape[1] + static["max_new_tokens"], num_samples)
        out, _ = _decode(runner, logits, cache, rng, temperature, top_p, **static)
    return out


class Sampler:
    """Compiled sampling for one model (and optionally one mesh).

    `Sampler(model_cfg)(params, prompts, prompt_lengths, rng, cfg)` runs one jitted
    program: the prefill, then the decode loop (a `lax.while_loop` that writes the KV
    cache in place); nothing waits on the host in between. Compiled programs are kept per
    (batch, prompt length, `num_samples`, static sampling settings: `max_new_tokens`,
    `top_k`, stop ids, `pad_id`); temperature and top-p are traced, so changing them
    never recompiles.

    With a mesh, the program is jitted with explicit shardings: parameters by
    `sharding.param_shardings`, prompts and outputs by the `batch` rule; inside it the
    cache follows `KVCache.logical_axes` (of the layout in use). Host (NumPy) inputs are
    placed accordingly; on several hosts pass global arrays (e.g. from
    `sharding.shard_batch`).

    Args:
      model_cfg: the model's config.
      mesh: optional device mesh (see `sharding.make_mesh`).
      rules: logical-axis rules.
      unstack_layers: run the model in its "per_layer" layout (`Transformer(cfg,
        layer_params="per_layer")`): inside each call, the stacked layer weights are
        copied into per-layer arrays once per call (`unstack_layer_params`, a temporary
        of the sampling program that the prefill and every decode step read) and the
        cache keeps one buffer per layer, so that decode steps read them in place
        (XLA:CPU otherwise copies every layer's weights out of the stack at every step).
        Costs one extra copy of the layer weights while sampling. Default: True on CPU,
        False elsewhere.
    """

    def __init__(self, model_cfg: ModelConfig, mesh: Mesh | None = None,
                 rules=shd.DEFAULT_RULES, unstack_layers: bool | None = None):
        self.model_cfg = model_cfg
        self.mesh = mesh
        self.rules = rules
        self.unstack_layers = (_default_unstack(mesh) if unstack_layers is None
                               else unstack_layers)
        self._param_shardings = (None if mesh is None
                                 else shd.param_shardings(model_cfg, mesh, rules))
        self._tree_shardings: dict[Any, Any] = {}  # params treedef -> its shardings
        self._compiled: dict[tuple, Callable] = {}  # jitted sampling programs

    def _shardings_of(self, params):
        """Shardings for a params tree: the model's own for its parameters; leaves the
        model does not declare (LoRA adapters) keep the mesh sharding they already have
        (they are sharded like their base by whoever made them), else replicate."""
        treedef = jax.tree.structure(params)
        if treedef not in self._tree_shardings:
            base = {jax.tree_util.keystr(p): s for p, s in
                    jax.tree_util.tree_leaves_with_path(self._param_shardings)}
            replicated = NamedSharding(self.mesh, P())

            def pick(path, x):
                key = jax.tree_util.keystr(path)
                if key in base:
                    return base[key]
                s = getattr(x, "sharding", None)
                if isinstance(s, NamedSharding) and s.mesh == self.mesh:
                    return s
                return replicated
            self._tree_shardings[treedef] = jax.tree_util.tree_map_with_path(pick, params)
        return self._tree_shardings[treedef]

    def _named(self, names, shape) -> NamedSharding:
        return NamedSharding(self.mesh, shd.logical_to_spec(names, shape, self.mesh, self.rules))

    def _sample_fn(self, batch: int, prompt_len: int, static: dict[str, Any],
                   param_shardings=None, num_samples: int = 1) -> Callable:
        key = ("sample", batch, prompt_len, tuple(sorted(static.items())),
               jax.tree.structure(param_shardings), num_samples)
        if key not in self._compiled:
            cfg, mesh, rules, unstack = self.model_cfg, self.mesh, self.rules, self.unstack_layers

            def sample_fn(params, prompts, prompt_lengths, rng, temperature, top_p):
                return _generate(cfg, params, prompts, prompt_lengths, rng, temperature,
                                 top_p, static=static, num_samples=num_samples,
                                 unstack=unstack, mesh=mesh, rules=rules)

            if mesh is None:
                self._compiled[key] = jax.jit(sample_fn)
            else:
                n = batch * num_samples
                rows = self._named(("batch",), (n,))
                out_rows = self._named(("batch", None), (n, static["max_new_tokens"]))
                rep = NamedSharding(mesh, P())
                self._compiled[key] = jax.jit(
                    sample_fn,
                    in_shardings=(param_shardings,
                                  self._named(("batch", None), (batch, prompt_len)),
                                  self._named(("batch",), (batch,)), rep, rep, rep),
                    out_shardings=SampleOutput(tokens=out_rows, logprobs=out_rows,
                                               lengths=rows, truncated=rows))
        return self._compiled[key]

    def __call__(self, params, prompts: jax.Array, prompt_lengths: jax.Array, rng: jax.Array,
                 cfg: SamplingConfig = SamplingConfig()) -> SampleOutput:
        """Samples completions of right-padded `prompts` [B, P] with `prompt_lengths` [B].

        Args:
          params: the model's parameters.
          prompts: int [B, P], right-padded (any padding value).
          prompt_lengths: int [B], each in [1, P].
          rng: a PRNG key; the same key gives the same output.
          cfg: sampling settings.

        Returns:
          A `SampleOutput` (dispatched asynchronously, like any jitted result) of
          `B * cfg.num_samples` rows, prompt-major.
        """
        if not isinstance(prompts, jax.Array):
            prompts = np.asarray(prompts)
        if not isinstance(prompt_lengths, jax.Array):
            prompt_lengths = np.asarray(prompt_lengths)
        _check_inputs(prompts, prompt_lengths)
        prompts = prompts.astype(np.int32) if prompts.dtype != np.int32 else prompts
        if prompt_lengths.dtype != np.int32:
            prompt_lengths = prompt_lengths.astype(np.int32)
        static = _static_args(self.model_cfg, cfg)
        batch, prompt_len = prompts.shape
        param_shardings = None if self.mesh is None else self._shardings_of(params)
        sample_fn = self._sample_fn(batch, prompt_len, static, param_shardings,
                                    int(cfg.num_samples))
        if self.mesh is not None:
            params = jax.device_put(params, param_shardings)
            prompts = jax.device_put(prompts, self._named(("batch", None), prompts.shape))
            prompt_lengths = jax.device_put(prompt_lengths, self._named(("batch",), (batch,)))
        return sample_fn(params, prompts, prompt_lengths, rng, jnp.float32(cfg.temperature),
                         jnp.float32(cfg.top_p))
