"""The standard workloads of ../shared/BENCHMARKS.md: model dims, workload shapes, FLOP
accounting and the per-measurement record, shared by every peer worker (pure Python).

The definitions are those of the project's reference scripts (../shared/peers/common.py);
`quick` shrinks them for the smoke test of `python -m benchmarks.run --quick`, which checks
that the command works and never measures a speed.
"""

from __future__ import annotations

import dataclasses
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

# ---- the accelerator model (issue 14, item 4): Llama 3.2 1B's shapes ----------------------
# jaxpost's preset "llama3.2-1b" (its Llama 3 RoPE scaling changes no cost); 1,235,814,400
# parameters, tied embeddings. Run in bfloat16 on a GPU or TPU: `--model llama3.2-1b
# --dtype bfloat16`.
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    num_layers=16,
    num_heads=32,
    head_dim=64,
    num_kv_heads=8,
    intermediate_size=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_embeddings=True,
    max_position_embeddings=4096,
    dtype="float32",
)
MODELS = {"tiny-llama": TINY_LLAMA, "llama3.2-1b": LLAMA_1B}
DTYPES = ("float32", "bfloat16")

# ---- workloads ---------------------------------------------------------------------------
W_SFT = dict(batch=4, seq=256, lr=1e-4, warmup=2, steps=6)
W_GEN = dict(batch=16, prompt_len=64, new_tokens=64, temperature=1.0, warmup=1, reps=5)
W_GRPO = dict(num_prompts=4, group_size=4, prompt_len=64, new_tokens=64,
              beta=0.04, lr=1e-4, temperature=1.0, eps_clip=0.2, warmup=1, steps=4)
MATMUL_SIZES = (1024, 2048, 4096)
MATMUL_REPS = dict(warmup=3, reps=10)
COPY_MIB = 256  # the memory-bandwidth probe: y = 2 x over this many MiB of the dtype

# The same workloads at the 1B model's scale on an accelerator: big enough that a step is
# not launch-bound (W-SFT 8192 tokens a step; the rollout 64 rows), small enough for one
# 80 GB GPU without remat (float32 master weights and Adam moments ~20 GB).
SCALED = {"llama3.2-1b": dict(
    sft=dict(batch=8, seq=1024, warmup=2, steps=10),
    gen=dict(batch=64, prompt_len=128, new_tokens=128, reps=5),
    grpo=dict(num_prompts=8, group_size=8, prompt_len=128, new_tokens=128, steps=4),
    matmul=dict(sizes=(4096, 8192), copy_mib=2048))}

#: Dense matmul peaks of accelerators from their spec sheets, TFLOP/s (bf16 without
#: sparsity; float32 without TF32), by a substring of the JAX device kind: W-SFT's "MFU
#: (spec)" divides by these, as MFU is usually quoted; "MFU" divides by the peak measured
#: in the same run.
NOMINAL_TFLOPS = {"H100": {"bfloat16": 989.4, "float32": 66.9},
                  "H200": {"bfloat16": 989.4, "float32": 66.9},
                  "A100": {"bfloat16": 312.0, "float32": 19.5},
                  "TPU v5 lite": {"bfloat16": 197.0}, "TPU v5e": {"bfloat16": 197.0},
                  "TPU v4": {"bfloat16": 275.0}, "TPU v6": {"bfloat16": 918.0}}

# ---- the --quick smoke test: a shrunken model, one warm-up and one timed step -------------
QUICK_MODEL = dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, head_dim=16,
                   num_kv_heads=2, intermediate_size=128)
QUICK_SFT = dict(batch=2, seq=32, warmup=1, steps=1)
QUICK_GEN = dict(batch=4, prompt_len=8, new_tokens=8, warmup=1, reps=1)
QUICK_GRPO = dict(num_prompts=2, group_size=2, prompt_len=8, new_tokens=8, warmup=1, steps=1)
QUICK_MATMUL_SIZES = (128, 256)
QUICK_MATMUL_REPS = dict(warmup=1, reps=2)

WORKLOAD_IDS = {"sft": "W-SFT", "gen": "W-GEN", "grpo": "W-GRPO", "peak": "peak"}


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a worker runs: the model (a key of `MODELS`), the compute dtype, and whether
    it is the --quick smoke test (the model's dims and the workloads shrunk; the model's
    other traits, such as tied embeddings, and the dtype kept)."""

    model: str = "tiny-llama"
    dtype: str = "float32"
    quick: bool = False

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model {self.model!r}; known: {', '.join(MODELS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}; known: {', '.join(DTYPES)}")

    def argv(self) -> list[str]:
        """The worker's command-line flags for this spec."""
        return ["--model", self.model, "--dtype", self.dtype] + (["--quick"] if self.quick
                                                                 else [])


def _shape(spec: Spec, name: str, base: dict, quick: dict) -> dict:
    return {**base, **SCALED.get(spec.model, {}).get(name, {}), **(quick if spec.quick else {})}


def model(spec: Spec = Spec()) -> dict:
    """The model's dims with the spec's dtype (quick: shrunk)."""
    return {**MODELS[spec.model], **(QUICK_MODEL if spec.quick else {}), "dtype": spec.dtype}


def sft(spec: Spec = Spec()) -> dict:
    return _shape(spec, "sft", W_SFT, QUICK_SFT)


def gen(spec: Spec = Spec()) -> dict:
    return _shape(spec, "gen", W_GEN, QUICK_GEN)


def grpo(spec: Spec = Spec()) -> dict:
    return _shape(spec, "grpo", W_GRPO, QUICK_GRPO)


def matmul(spec: Spec = Spec()) -> tuple[tuple[int, ...], dict, int]:
    """(matmul sizes, repetitions, MiB of the bandwidth probe)."""
    if spec.quick:
        return QUICK_MATMUL_SIZES, QUICK_MATMUL_REPS, 4
    scaled = SCALED.get(spec.model, {}).get("matmul", {})
    return (scaled.get("sizes", MATMUL_SIZES), MATMUL_REPS,
            scaled.get("copy_mib", COPY_MIB))


def dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def decode_bytes(c: dict, rows: int, prompt_len: int, new_tokens: int) -> int:
    """The bytes a sampling call must read from memory at the least: every matmul weight
    once per decode step, at the compute dtype, plus the keys and values cached so far for
    every row (no prompt sharing). The prefill is counted as one step. Dividing by the
    call's time gives the rate a memory-bound rollout is judged by."""
    b = dtype_bytes(c["dtype"])
    weights = param_counts(c)["matmul"] * b
    kv_per_slot = 2 * c["num_layers"] * c["num_kv_heads"] * c["head_dim"] * b * rows
    # Step i (1..new_tokens-1) reads prompt_len + i cached slots.
    kv_slots = sum(prompt_len + i for i in range(1, new_tokens))
    return new_tokens * weights + kv_per_slot * kv_slots


def nominal_tflops(device_kind: str, dtype: str) -> float | None:
    """The spec-sheet dense matmul peak of a device kind, or None (a CPU, an unknown one)."""
    for key, peaks in NOMINAL_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


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
