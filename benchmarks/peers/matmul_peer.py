"""The float32 matmul peak: square C = A @ B in torch, jax (jit jnp.dot) and numpy, whichever
import, at n = 1024 / 2048 / 4096 (quick: tiny sizes); GFLOP/s = 2 n^3 / t, median of the
repetitions after warm-ups (as ../shared/peers/matmul_peak.py). W-SFT's MFU divides by the
largest of these medians measured in the same run."""

from __future__ import annotations

import statistics
import time

from benchmarks import workloads as W

VERSIONS: dict = {}


def _bench(mk, mm, sync, n, warmup, reps):
    a, b = mk(n)
    for _ in range(warmup):
        sync(mm(a, b))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(mm(a, b))
        ts.append(time.perf_counter() - t0)
    return ts


def _records(framework, mk, mm, sync, sizes, reps):
    out = []
    for n in sizes:
        ts = _bench(mk, mm, sync, n, reps["warmup"], reps["reps"])
        out.append(W.record(framework, f"matmul_fp32_{n}", ts,
                            extra={"framework": framework, "n": n,
                                   "gflops_median": 2 * n ** 3 / statistics.median(ts) / 1e9,
                                   "gflops_max": 2 * n ** 3 / min(ts) / 1e9}))
    return out


def peak(quick: bool) -> list[dict]:
    sizes, reps = W.matmul(quick)
    out = []
    try:
        import torch
    except ImportError:
        pass
    else:
        VERSIONS.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
        out += _records("torch", lambda n: (torch.randn(n, n), torch.randn(n, n)),
                        torch.matmul, lambda r: r, sizes, reps)
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        pass
    else:
        VERSIONS.update(jax=jax.__version__)

        def mk(n):
            k1, k2 = jax.random.split(jax.random.PRNGKey(0))
            return (jax.random.normal(k1, (n, n), jnp.float32),
                    jax.random.normal(k2, (n, n), jnp.float32))
        out += _records("jax", mk, jax.jit(jnp.dot), lambda r: r.block_until_ready(), sizes,
                        reps)
    import numpy as np
    VERSIONS.update(numpy=np.__version__)
    rng = np.random.default_rng(0)
    out += _records("numpy", lambda n: (rng.standard_normal((n, n), dtype=np.float32),
                                        rng.standard_normal((n, n), dtype=np.float32)),
                    np.matmul, lambda r: r, sizes[1:2] or sizes, reps)
    return out


WORKLOADS = {"peak": peak}
