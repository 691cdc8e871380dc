"""Runs one workload of one peer in this process and writes its records as JSON.

    python -m benchmarks.peers.worker PEER WORKLOAD OUT.json [--model M] [--dtype D] [--quick]

OUT.json gets `{"status": "ok", "records": [...], "versions": {...}}`; a peer whose module
fails to import gets `status "not_installed"` with the import error (exit 3), a workload
that raises gets `status "failed"` with the traceback (exit 1). `benchmarks.run` starts one
such process per (peer, workload) so that each one's peak RSS is that workload's alone.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback

PEERS = ("jaxpost", "jax", "tunix", "torch", "trl", "matmul")  # modules <name>_peer.py
EXIT_NOT_INSTALLED = 3


def _write(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("peer", choices=PEERS)
    p.add_argument("workload")
    p.add_argument("out")
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    from benchmarks.workloads import Spec
    spec = Spec(model=args.model, dtype=args.dtype, quick=args.quick)
    try:
        module = importlib.import_module(f"benchmarks.peers.{args.peer}_peer")
    except ImportError as e:
        _write(args.out, {"status": "not_installed", "error": f"{type(e).__name__}: {e}"})
        print(f"[{args.peer}] not installed: {e}", file=sys.stderr)
        return EXIT_NOT_INSTALLED
    if args.workload not in module.WORKLOADS:
        _write(args.out, {"status": "failed", "error": f"{args.peer} has no workload "
                          f"{args.workload!r} (it has {sorted(module.WORKLOADS)})"})
        return 1
    try:
        records = module.WORKLOADS[args.workload](spec)
    except Exception as e:  # noqa: BLE001 - reported to the runner, which goes on
        traceback.print_exc()
        _write(args.out, {"status": "failed", "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc(),
                          "versions": getattr(module, "VERSIONS", {})})
        return 1
    _write(args.out, {"status": "ok", "records": records,
                      "versions": getattr(module, "VERSIONS", {})})
    return 0


if __name__ == "__main__":
    sys.exit(main())
