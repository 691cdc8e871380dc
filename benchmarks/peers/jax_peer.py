"""Plain JAX reference (hand-written Llama, jit, optax AdamW): W-SFT and W-GEN.

As ../shared/peers/jax_ref_bench.py. W-SFT: next-token CE on random ids (shifted, as HF's
labels=input_ids), optax.adamw(lr, weight_decay=0.01), params and optimizer state donated.
W-GEN: jitted prefill + a lax.fori_loop decode with a preallocated KV cache (B, S, KV, D),
plain temperature sampling. Python-unrolled layers, einsum GQA attention, boolean causal mask.
In bfloat16 (`--dtype bfloat16`) the usual mixed precision: float32 master weights and Adam
moments, the forward on a bfloat16 copy of the weights, softmax and the loss in float32;
the sampler casts the weights to bfloat16 once per call and caches keys and values in it.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import workloads as W

PEER = "jax"
VERSIONS = {"jax": jax.__version__, "jaxlib": __import__("jaxlib").__version__,
            "optax": optax.__version__, "backend": jax.default_backend(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


class Llama:
    """The hand-written model of one config dict (`benchmarks.workloads.model`)."""

    def __init__(self, c: dict):
        self.V, self.D, self.L = c["vocab_size"], c["hidden_size"], c["num_layers"]
        self.H, self.KV, self.HD = c["num_heads"], c["num_kv_heads"], c["head_dim"]
        self.F, self.eps, self.theta = c["intermediate_size"], c["rms_norm_eps"], c["rope_theta"]
        self.tied, self.dtype = c["tie_embeddings"], jnp.dtype(c["dtype"])

    def init_params(self, key):
        D, H, KV, HD, F = self.D, self.H, self.KV, self.HD, self.F
        ks = iter(jax.random.split(key, 2 + 7 * self.L))
        n = lambda shape: 0.02 * jax.random.normal(next(ks), shape, jnp.float32)  # noqa: E731
        layers = [dict(ln1=jnp.ones((D,)), ln2=jnp.ones((D,)), wq=n((D, H * HD)),
                       wk=n((D, KV * HD)), wv=n((D, KV * HD)), wo=n((H * HD, D)),
                       wg=n((D, F)), wu=n((D, F)), wd=n((F, D))) for _ in range(self.L)]
        params = dict(embed=n((self.V, D)), layers=layers, norm=jnp.ones((D,)))
        if not self.tied:
            params["head"] = n((D, self.V))
        return params

    def cast(self, params):
        """The weights in the compute dtype (a no-op in float32)."""
        return jax.tree.map(lambda w: w.astype(self.dtype), params)

    def head(self, params, x):
        """Logits in float32 (the loss and sampling read them in float32)."""
        w = params["embed"].T if self.tied else params["head"]
        return jnp.matmul(x, w, preferred_element_type=jnp.float32)

    def rms(self, x, w):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * w

    def rope(self, x, pos):  # x (B,T,N,HD), pos (B,T); HF rotate_half convention
        HD = self.HD
        inv = 1.0 / (self.theta ** (jnp.arange(0, HD, 2, dtype=jnp.float32) / HD))
        ang = pos[..., None].astype(jnp.float32) * inv
        cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, :, None, :].astype(x.dtype)
        sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, :, None, :].astype(x.dtype)
        x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
        return x * cos + jnp.concatenate([-x2, x1], -1) * sin

    def attend(self, q, k, v, mask):  # q (B,T,H,HD) k,v (B,S,KV,HD) mask (B|1,T,S)
        B, T = q.shape[:2]
        H, KV, HD = self.H, self.KV, self.HD
        q = q.reshape(B, T, KV, H // KV, HD)
        s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32
                       ) / jnp.sqrt(HD)
        s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, H * HD)

    def block(self, lp, x, pos, mask, kv_cache=None, cache_idx=None):
        B, T, _ = x.shape
        H, KV, HD = self.H, self.KV, self.HD
        h = self.rms(x, lp["ln1"])
        q = self.rope((h @ lp["wq"]).reshape(B, T, H, HD), pos)
        k = self.rope((h @ lp["wk"]).reshape(B, T, KV, HD), pos)
        v = (h @ lp["wv"]).reshape(B, T, KV, HD)
        if kv_cache is not None:
            ck, cv = kv_cache
            ck = jax.lax.dynamic_update_slice(ck, k, (0, cache_idx, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v, (0, cache_idx, 0, 0))
            k, v, kv_cache = ck, cv, (ck, cv)
        x = x + self.attend(q, k, v, mask) @ lp["wo"]
        h = self.rms(x, lp["ln2"])
        x = x + (jax.nn.silu(h @ lp["wg"]) * (h @ lp["wu"])) @ lp["wd"]
        return x, kv_cache

    def forward(self, params, ids):
        params = self.cast(params)
        B, T = ids.shape
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask = jnp.tril(jnp.ones((T, T), bool))[None]
        x = params["embed"][ids]
        for lp in params["layers"]:
            x, _ = self.block(lp, x, pos, mask)
        return self.head(params, self.rms(x, params["norm"]))

    def loss(self, params, ids):
        logits = self.forward(params, ids)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def w_sft(spec: W.Spec) -> list[dict]:
    s, c = W.sft(spec), W.model(spec)
    B, T = s["batch"], s["seq"]
    m = Llama(c)
    params = m.init_params(jax.random.PRNGKey(0))
    opt = optax.adamw(s["lr"], weight_decay=0.01)
    state = opt.init(params)
    ids = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, c["vocab_size"])

    def _step(params, state, ids):
        loss, g = jax.value_and_grad(m.loss)(params, ids)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    step = jax.jit(_step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    params, state, loss = step(params, state, ids)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    losses = [float(loss)]
    for _ in range(s["warmup"] - 1):
        params, state, loss = step(params, state, ids)
        loss.block_until_ready()
    ts = []
    for _ in range(s["steps"]):
        t0 = time.perf_counter()
        params, state, loss = step(params, state, ids)
        loss.block_until_ready()
        ts.append(time.perf_counter() - t0)
        losses.append(float(loss))
    fl = W.sft_flops_per_step(s, c)
    return [W.record(PEER, "W-SFT", ts, tokens_per_iter=B * T,
                     extra={"flops_per_step": fl,
                            "achieved_gflops": fl / statistics.median(ts) / 1e9,
                            "first_step_incl_compile_s": compile_s, "loss_first": losses[0],
                            "loss_last": losses[-1], "dtype": spec.dtype,
                            "device_kind": jax.devices()[0].device_kind}, versions=VERSIONS)]


def make_generate(m: Llama, B: int, P: int, N: int, temperature: float):
    S = P + N

    def prefill_and_decode(params, prompts, key):
        params = m.cast(params)
        caches = [(jnp.zeros((B, S, m.KV, m.HD), m.dtype), jnp.zeros((B, S, m.KV, m.HD), m.dtype))
                  for _ in range(m.L)]
        pos = jnp.broadcast_to(jnp.arange(P), (B, P))
        mask = (jnp.arange(S)[None, :] <= jnp.arange(P)[:, None])[None]  # 1,P,S
        x = params["embed"][prompts]
        new = []
        for lp, c in zip(params["layers"], caches):
            x, c = m.block(lp, x, pos, mask, c, 0)
            new.append(c)
        logits = m.head(params, m.rms(x[:, -1:], params["norm"]))
        key, sk = jax.random.split(key)
        tok = jax.random.categorical(sk, logits[:, 0] / temperature)
        out = jnp.zeros((B, N), jnp.int32).at[:, 0].set(tok)

        def body(i, carry):
            caches, tok, out, key = carry
            idx = P + i - 1
            pos = jnp.full((B, 1), idx)
            mask = (jnp.arange(S) <= idx)[None, None, :]
            x = params["embed"][tok][:, None]
            nc = []
            for lp, c in zip(params["layers"], caches):
                x, c = m.block(lp, x, pos, mask, c, idx)
                nc.append(c)
            logits = m.head(params, m.rms(x, params["norm"]))
            key, sk = jax.random.split(key)
            tok = jax.random.categorical(sk, logits[:, 0] / temperature).astype(jnp.int32)
            return nc, tok, out.at[:, i].set(tok), key

        _, _, out, _ = jax.lax.fori_loop(1, N, body, (new, tok.astype(jnp.int32), out, key))
        return out

    return jax.jit(prefill_and_decode)


def w_gen(spec: W.Spec) -> list[dict]:
    g, c = W.gen(spec), W.model(spec)
    B, P, N = g["batch"], g["prompt_len"], g["new_tokens"]
    m = Llama(c)
    params = m.init_params(jax.random.PRNGKey(0))
    prompts = jax.random.randint(jax.random.PRNGKey(2), (B, P), 3, c["vocab_size"])
    gen = make_generate(m, B, P, N, g["temperature"])
    t0 = time.perf_counter()
    out = gen(params, prompts, jax.random.PRNGKey(5)).block_until_ready()
    compile_s = time.perf_counter() - t0
    for i in range(g["warmup"] - 1):
        out = gen(params, prompts, jax.random.PRNGKey(100 + i)).block_until_ready()
    ts = []
    for i in range(g["reps"]):
        t0 = time.perf_counter()
        out = gen(params, prompts, jax.random.PRNGKey(10 + i)).block_until_ready()
        ts.append(time.perf_counter() - t0)
    assert out.shape == (B, N), out.shape
    return [W.record(PEER, "W-GEN", ts, tokens_per_iter=B * N,
                     extra={"first_call_incl_compile_s": compile_s, "dtype": spec.dtype,
                            "decode_bytes": W.decode_bytes(c, B, P, N),
                            "device_kind": jax.devices()[0].device_kind}, versions=VERSIONS)]


WORKLOADS = {"sft": w_sft, "gen": w_gen}
