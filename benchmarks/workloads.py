"""The standard workloads of ../shared/BENCHMARKS.md: model dims, workload shapes, FLOP
accounting and the per-measurement record, shared by every peer worker (pure Python).

The definitions are those of the project's reference scripts (../shared/peers/common.py);
`quick` shrinks them for the smoke test of `python -m benchmarks.run --quick`, which checks
that the command works and never measures a speed.
"""

from __future__ import annotations

import os
import statistics
import time

# ---- standard model "tiny-llama" -------------------------------------------------------
TINY_LLAMA = dict(
    vocab_size=16384,
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    head_dim=64,
    num_kv_heads=4,
    intermediate_size=1536,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_embeddings=False,
    max_position_embeddings=1024,
    dtype="float32",
)

# ---- workloads ---------------------------------------------------------------------------
W_SFT = dict(batch=4, seq=256, lr=1e-4, warmup=2, steps=6)
W_GEN = dict(batch=16, prompt_len=64, new_tokens=64, temperature=1.0, warmup=1, reps=5)
W_GRPO = dict(num_prompts=4, group_size=4, prompt_len=64, new_tokens=64,
              beta=0.04, lr=1e-4, temperature=1.0, eps_clip=0.2, warmup=1, steps=4)
MATMUL_SIZES = (1024, 2048, 4096)
MATMUL_REPS = dict(warmup=3, reps=10)

# ---- the --quick smoke test: a shrunken model, one warm-up and one timed step -------------
QUICK_MODEL = dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, head_dim=16,
                   num_kv_heads=2, intermediate_size=128)
QUICK_SFT = dict(batch=2, seq=32, warmup=1, steps=1)
QUICK_GEN = dict(batch=4, prompt_len=8, new_tokens=8, warmup=1, reps=1)
QUICK_GRPO = dict(num_prompts=2, group_size=2, prompt_len=8, new_tokens=8, warmup=1, steps=1)
QUICK_MATMUL_SIZES = (128, 256)
QUICK_MATMUL_REPS = dict(warmup=1, reps=2)

WORKLOAD_IDS = {"sft": "W-SFT", "gen": "W-GEN", "grpo": "W-GRPO", "peak": "peak"}


def model(quick: bool = False) -> dict:
    """The tiny-llama dims (quick: shrunk)."""
    return {**TINY_LLAMA, **(QUICK_MODEL if quick else {})}


def sft(quick: bool = False) -> dict:
    return {**W_SFT, **(QUICK_SFT if quick else {})}


def gen(quick: bool = False) -> dict:
    return {**W_GEN, **(QUICK_GEN if quick else {})}


def grpo(quick: bool = False) -> dict:
    return {**W_GRPO, **(QUICK_GRPO if quick else {})}


def matmul(quick: bool = False) -> tuple[tuple[int, ...], dict]:
    return (QUICK_MATMUL_SIZES, QUICK_MATMUL_REPS) if quick else (MATMUL_SIZES, MATMUL_REPS)


def param_counts(c: dict = TINY_LLAMA) -> dict:
    d, f, L, V = c["hidden_size"], c["intermediate_size"], c["num_layers"], c["vocab_size"]
    q = c["num_heads"] * c["head_dim"]
    kv = c["num_kv_heads"] * c["head_dim"]
    attn = d * q + 2 * d * kv + q * d
    mlp = 3 * d * f
    norms = 2 * d
    per_layer = attn + mlp + norms
    embed = V * d
    head = 0 if c["tie_embeddings"] else V * d
    total = embed + head + L * per_layer + d
    # parameters that take part in a matmul per token (excludes embedding gather and norms)
    matmul_params = L * (attn + mlp) + V * d
    return dict(total=total, matmul=matmul_params, embed=embed, per_layer=per_layer)


def train_flops_per_token(seq: int, c: dict = TINY_LLAMA) -> int:
    """6*N_matmul + attention (PaLM convention, 12*L*d_attn*seq, no causal halving)."""
    n = param_counts(c)["matmul"]
    d_attn = c["num_heads"] * c["head_dim"]
    return 6 * n + 12 * c["num_layers"] * d_attn * seq


def sft_flops_per_step(s: dict, c: dict = TINY_LLAMA) -> int:
    """Training FLOPs of one W-SFT step (batch x seq tokens)."""
    return train_flops_per_token(s["seq"], c) * s["batch"] * s["seq"]


def summarize(times: list[float]) -> dict:
    return dict(median=statistics.median(times), min=min(times), max=max(times),
                n=len(times), all=[round(t, 4) for t in times])


def record(peer: str, workload: str, times: list[float], tokens_per_iter: int | None = None,
           extra: dict | None = None, versions: dict | None = None) -> dict:
    """One measurement (per-iteration times and their summary), printed as one line."""
    s = summarize(times)
    rec = dict(peer=peer, workload=workload, **s,
               time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               loadavg_at_end=[round(x, 2) for x in os.getloadavg()])
    if tokens_per_iter:
        rec["tokens_per_iter"] = tokens_per_iter
        rec["tokens_per_s_median"] = tokens_per_iter / s["median"]
    rec.update(extra or {})
    if versions:
        rec["versions"] = versions
    tp = f" tok/s={rec['tokens_per_s_median']:.1f}" if tokens_per_iter else ""
    print(f"[{peer}] {workload}: median={s['median']:.4f}s min={s['min']:.4f}s "
          f"max={s['max']:.4f}s{tp}", flush=True)
    return rec


def even_fraction(prompts, completions, **columns) -> list[float]:
    """W-GRPO's reward: the fraction of even token ids in a completion, given as its ids
    written in decimal separated by spaces (as the benchmark tokenizers decode)."""
    del prompts, columns
    out = []
    for text in completions:
        ids = [int(t) for t in text.split()]
        out.append(sum(1 for t in ids if t % 2 == 0) / max(1, len(ids)))
    return out
