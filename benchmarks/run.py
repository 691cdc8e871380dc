"""jaxpost side by side with its peers on the standard workloads (../shared/BENCHMARKS.md).

    python -m benchmarks.run [--peers jaxpost,jax,tunix,torch,trl] [--workloads sft,gen,grpo,...]
                             [--rounds 2] [--quick] [--out DIR] [--tunix-python PATH]
                             [--xla-flags "--xla_..."] [--model tiny-llama] [--dtype float32]

Every (peer, workload) runs in its own subprocess (`benchmarks.peers.worker`), one at a
time, so that its peak RSS is that workload's alone; round r runs every peer once, the
peer order rotated by r, so drift on a shared machine hits all peers alike; each round
starts with the matmul peak that W-SFT's MFU divides by (and the memory bandwidth the
sampling rates are compared with). `--model llama3.2-1b --dtype bfloat16` is the
accelerator run (the 1B model, workloads scaled up; jaxpost, plain JAX, torch). A peer that does not
import is reported as not installed; a workload that fails is reported and the run goes
on (the command then exits 1). Prints the table and writes DIR/results.json and
DIR/table.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time

from benchmarks import report
from benchmarks import workloads as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ("sft", "gen", "grpo", "grpo-beta0", "grpo-lora")  # jaxpost runs them all
QUICK_WORKLOADS = ("sft", "gen", "grpo")  # the smoke test skips the memory variants
PEER_WORKLOADS = {"jaxpost": WORKLOADS, "jax": ("sft", "gen"),
                  "tunix": ("sft", "gen", "grpo"), "torch": ("sft", "gen", "grpo"),
                  "trl": ("sft", "grpo")}
JAX_PEERS = ("jaxpost", "jax", "tunix", "matmul")  # get --xla-flags
#: Peers that run other models and dtypes than tiny-llama in float32 (Tunix's and TRL's
#: workers are written for the CPU comparison of ../shared/BENCHMARKS.md only).
SCALABLE_PEERS = ("jaxpost", "jax", "torch")
DEFAULT_TUNIX_PYTHON = os.path.join(ROOT, ".bench", "venv-tunix", "bin", "python")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                description=__doc__.splitlines()[0])
    p.add_argument("--peers", default=",".join(PEER_WORKLOADS),
                   help="comma list of peers (default: all): " + ", ".join(PEER_WORKLOADS))
    p.add_argument("--workloads", default=None,
                   help="comma list of " + ", ".join(WORKLOADS) + " (default: all; with "
                   "--quick: " + ",".join(QUICK_WORKLOADS) + "); grpo-beta0 and grpo-lora "
                   "are jaxpost's W-GRPO with beta 0 and with LoRA, for their memory")
    p.add_argument("--rounds", type=int, default=None,
                   help="repetitions, peers alternating (default 2; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: shrunken model, one warm-up and one timed step; "
                        "checks that the command works, measures nothing")
    p.add_argument("--out", default="", help="output folder (default "
                   "benchmarks/results/<UTC time>/): results.json, table.md, logs/")
    p.add_argument("--tunix-python", default=DEFAULT_TUNIX_PYTHON,
                   help="the interpreter of the Tunix environment (benchmarks/setup_peers.sh)")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter of every other peer (default: this one)")
    p.add_argument("--xla-flags", default=None,
                   help="XLA_FLAGS for the JAX workers (jaxpost, plain JAX, Tunix, matmul), "
                   'e.g. --xla-flags "--xla_cpu_use_fusion_emitters=false"')
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds before a worker is killed and reported as failed")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak (no MFU)")
    p.add_argument("--model", default="tiny-llama", choices=list(W.MODELS),
                   help="tiny-llama (the CPU workloads) or llama3.2-1b (the accelerator "
                   "run: the workloads scaled up; jaxpost, plain JAX and torch only)")
    p.add_argument("--dtype", default="float32", choices=list(W.DTYPES),
                   help="compute dtype (bfloat16: float32 master weights, bfloat16 matmuls)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--xla-flags" in argv[:-1]:  # argparse takes "--xla_..." for an option, not a value
        i = argv.index("--xla-flags")
        if argv[i + 1].startswith("--xla_"):  # not another option (a forgotten value)
            argv[i:i + 2] = [f"--xla-flags={argv[i + 1]}"]
    args = p.parse_args(argv)
    default_peers = args.peers == p.get_default("peers")
    args.peers = [x for x in args.peers.split(",") if x]
    if (args.model, args.dtype) != ("tiny-llama", "float32"):
        unscaled = [x for x in args.peers if x in PEER_WORKLOADS and x not in SCALABLE_PEERS]
        if unscaled and not default_peers:
            p.error(f"--peers: {', '.join(unscaled)} run tiny-llama in float32 only; "
                    f"with --model {args.model} --dtype {args.dtype} choose from "
                    f"{', '.join(SCALABLE_PEERS)}")
        args.peers = [x for x in args.peers if x not in unscaled]
    if args.workloads is None:
        args.workloads = ",".join(QUICK_WORKLOADS if args.quick else WORKLOADS)
    args.workloads = [x for x in args.workloads.split(",") if x]
    for name, values, known in (("--peers", args.peers, PEER_WORKLOADS),
                                ("--workloads", args.workloads, WORKLOADS)):
        bad = [v for v in values if v not in known]
        if bad or not values:
            p.error(f"{name}: unknown {bad or 'empty list'}; choose from {', '.join(known)}")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu_model": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
           "python": platform.python_version(),
           "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    gpu = _gpu_names()
    if gpu:
        out["device"] = gpu
    return out


def _gpu_names() -> str:
    """The NVIDIA GPUs nvidia-smi lists ("" where there is none or no nvidia-smi)."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               text=True, capture_output=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return ""
    names = [x.strip() for x in names if x.strip()]
    return f"{len(names)} x {names[0]}" if names else ""


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "jaxpost"], cwd=ROOT,
                               text=True, capture_output=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def schedule(peers: list[str], workloads: list[str], rounds: int,
             peak: bool = True) -> list[tuple[int, str, str]]:
    """(round, peer, workload) in run order: per round the matmul peak, then each peer's
    workloads, the peer order rotated by the round."""
    jobs = []
    for r in range(rounds):
        if peak:
            jobs.append((r + 1, "matmul", "peak"))
        k = r % len(peers)
        for peer in peers[k:] + peers[:k]:
            jobs += [(r + 1, peer, w) for w in workloads if w in PEER_WORKLOADS[peer]]
    return jobs


def run_worker(python: str, peer: str, workload: str, out_json: str, log_path: str, *,
               spec: W.Spec, env: dict, timeout: float) -> dict:
    """One worker process; returns its status, records, exit code, wall time and peak RSS
    (the child's ru_maxrss from wait4)."""
    cmd = [python, "-m", "benchmarks.peers.worker", peer, workload, out_json] + spec.argv()
    if os.path.exists(out_json):
        os.remove(out_json)
    t0 = time.perf_counter()
    timed_out = threading.Event()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return {"status": "not_installed", "error": f"cannot start {python}: {e}",
                    "rc": None, "wall_s": 0.0, "peak_rss_mib": None, "records": []}

        def kill():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C: the worker is in its own session, end it too
            kill()
            os.wait4(proc.pid, 0)
            raise
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    job = {"rc": proc.returncode, "wall_s": round(wall, 2),
           "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "records": []}
    payload = None
    if os.path.exists(out_json):
        with open(out_json) as f:
            try:
                payload = json.load(f)
            except json.JSONDecodeError:
                payload = None
    if timed_out.is_set():
        job.update(status="failed", error=f"killed after the {timeout:.0f} s timeout")
    elif payload is None:
        job.update(status="failed", error=f"exit code {proc.returncode}, no result; "
                   f"last log lines: {_tail(log_path)}")
    else:
        job.update(status=payload["status"], records=payload.get("records", []),
                   versions=payload.get("versions", {}))
        if payload["status"] != "ok":
            job["error"] = payload.get("error", "")
    return job


def _tail(path: str, lines: int = 3) -> str:
    with open(path, errors="replace") as f:
        return " | ".join(x.strip() for x in f.read().strip().splitlines()[-lines:])


def command_line(argv: list[str] | None) -> str:
    return "python -m benchmarks.run" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    out_dir = args.out or os.path.join(ROOT, "benchmarks", "results",
                                       started.strftime("%Y%m%dT%H%M%SZ"))
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "raw"), exist_ok=True)
    result = {"command": command_line(argv), "started_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
              "options": {"peers": args.peers, "workloads": args.workloads,
                          "rounds": args.rounds, "quick": args.quick,
                          "xla_flags": args.xla_flags, "tunix_python": args.tunix_python,
                          "python": args.python, "model": args.model, "dtype": args.dtype},
              "machine": machine(), "git": git_commit(), "jobs": [],
              "peers": {p: {"status": "pending"} for p in args.peers}}
    base_env = dict(os.environ)
    base_env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [x for x in base_env.get("PYTHONPATH", "").split(os.pathsep) if x])
    spec = W.Spec(model=args.model, dtype=args.dtype, quick=args.quick)
    t_start = time.perf_counter()
    for rnd, peer, workload in schedule(args.peers, args.workloads, args.rounds,
                                        peak=not args.no_peak):
        info = result["peers"].get(peer)
        if info is not None and info["status"] == "not_installed":
            continue
        python = args.tunix_python if peer == "tunix" else args.python
        env = dict(base_env)
        if args.xla_flags is not None and peer in JAX_PEERS:
            env["XLA_FLAGS"] = args.xla_flags
        name = f"r{rnd}_{peer}_{workload}"
        load = [round(x, 2) for x in os.getloadavg()]
        print(f"=== round {rnd}: {peer} {workload} (load {os.getloadavg()[0]:.2f})",
              flush=True)
        if not os.path.exists(python):
            job = {"status": "not_installed", "rc": None, "wall_s": 0.0,
                   "peak_rss_mib": None, "records": [],
                   "error": f"no interpreter {python}"
                            + (" (run benchmarks/setup_peers.sh or pass --tunix-python)"
                               if peer == "tunix" else "")}
        else:
            job = run_worker(python, peer, workload, os.path.join(out_dir, "raw", name + ".json"),
                             os.path.join(out_dir, "logs", name + ".log"), spec=spec,
                             env=env, timeout=args.timeout)
        job.update(round=rnd, peer=peer, workload=workload, loadavg_before=load)
        result["jobs"].append(job)
        if job["status"] == "ok":
            print(f"    ok in {job['wall_s']:.1f} s, peak RSS {job['peak_rss_mib']:.0f} MiB",
                  flush=True)
        elif job["status"] == "not_installed":
            print(f"    {peer}: not installed ({job['error']})", flush=True)
        else:
            print(f"    {peer} {workload} failed: {job['error']}", flush=True)
        if info is not None:
            if job["status"] == "not_installed":
                info.update(status="not_installed", error=job["error"])
            elif job.get("versions"):
                info.update(versions=job["versions"])
            if job["status"] == "ok":
                info["status"] = "ok"
            elif info["status"] == "pending":
                info["status"] = "failed"
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["peak"] = report.matmul_peak(result["jobs"])
    result["summary"] = report.summarize(result["jobs"], result["peak"])
    table = report.render(result)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    print("\n" + table)
    print(f"wrote {os.path.join(out_dir, 'results.json')} and table.md "
          f"({result['wall_s']:.0f} s)")
    # Exit 1 when a worker failed (its error is in the table); peers not installed are fine.
    return 1 if any(j["status"] == "failed" for j in result["jobs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
