"""The machine's peaks, measured in the run: the matmul peak (square C = A @ B in torch, jax
(jit jnp.dot) and numpy, whichever import, in the spec's dtype, numpy in float32 only) at
n = 1024 / 2048 / 4096 (the 1B model: 4096 / 8192; quick: tiny sizes), GFLOP/s = 2 n^3 / t,
median of the repetitions after warm-ups (as ../shared/peers/matmul_peak.py); and the memory
bandwidth (y = 2 x over COPY_MIB of the dtype, jax and torch, on the device they compute on),
GB/s = bytes read + written / t. W-SFT's MFU divides by the largest matmul median of the
run, the sampling rates are compared with the largest bandwidth median."""

from __future__ import annotations

import statistics
import time

from benchmarks import workloads as W

VERSIONS: dict = {}


def _bench(mk, op, sync, n, warmup, reps):
    args = mk(n)
    for _ in range(warmup):
        sync(op(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(op(*args))
        ts.append(time.perf_counter() - t0)
    return ts


def _records(framework, mk, mm, sync, sizes, reps, dtype):
    out = []
    for n in sizes:
        ts = _bench(mk, mm, sync, n, reps["warmup"], reps["reps"])
        name = "fp32" if dtype == "float32" else dtype
        out.append(W.record(framework, f"matmul_{name}_{n}", ts,
                            extra={"framework": framework, "n": n, "dtype": dtype,
                                   "gflops_median": 2 * n ** 3 / statistics.median(ts) / 1e9,
                                   "gflops_max": 2 * n ** 3 / min(ts) / 1e9}))
    return out


def _bandwidth(framework, mk, op, sync, mib, reps, dtype):
    """y = 2 x over `mib` MiB: one read and one write of every byte."""
    n = mib * 2 ** 20 // W.dtype_bytes(dtype)
    ts = _bench(mk, op, sync, n, reps["warmup"], reps["reps"])
    moved = 2 * n * W.dtype_bytes(dtype)
    return [W.record(framework, f"copy_{dtype}_{mib}MiB", ts,
                     extra={"framework": framework, "bytes": moved, "dtype": dtype,
                            "gbps_median": moved / statistics.median(ts) / 1e9,
                            "gbps_max": moved / min(ts) / 1e9})]


def peak(spec: W.Spec) -> list[dict]:
    sizes, reps, mib = W.matmul(spec)
    out = []
    try:
        import torch
    except ImportError:
        pass
    else:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        dt = getattr(torch, spec.dtype)
        VERSIONS.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                        torch_device=dev)

        def tsync(r):
            if dev == "cuda":
                torch.cuda.synchronize()
            return r
        out += _records("torch", lambda n: (torch.randn(n, n, dtype=dt, device=dev),
                                            torch.randn(n, n, dtype=dt, device=dev)),
                        torch.matmul, tsync, sizes, reps, spec.dtype)
        out += _bandwidth("torch", lambda n: (torch.randn(n, dtype=dt, device=dev),),
                          lambda x: x * 2, tsync, mib, reps, spec.dtype)
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        pass
    else:
        VERSIONS.update(jax=jax.__version__, jax_device=jax.devices()[0].device_kind)
        dt = jnp.dtype(spec.dtype)

        def mk(n):
            k1, k2 = jax.random.split(jax.random.PRNGKey(0))
            return (jax.random.normal(k1, (n, n), dt), jax.random.normal(k2, (n, n), dt))
        out += _records("jax", mk, jax.jit(jnp.dot), lambda r: r.block_until_ready(), sizes,
                        reps, spec.dtype)
        out += _bandwidth("jax", lambda n: (jax.random.normal(jax.random.PRNGKey(1), (n,), dt),),
                          jax.jit(lambda x: x * 2), lambda r: r.block_until_ready(), mib, reps,
                          spec.dtype)
    if spec.dtype == "float32":  # numpy has no bfloat16 matmul of its own
        import numpy as np
        VERSIONS.update(numpy=np.__version__)
        rng = np.random.default_rng(0)
        out += _records("numpy", lambda n: (rng.standard_normal((n, n), dtype=np.float32),
                                            rng.standard_normal((n, n), dtype=np.float32)),
                        np.matmul, lambda r: r, sizes[1:2] or sizes, reps, spec.dtype)
    return out


WORKLOADS = {"peak": peak}
