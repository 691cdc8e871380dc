"""The arithmetic and the table of `python -m benchmarks.run`: pooled medians per (workload,
peer), tokens/s, jaxpost's ratio to each peer, W-SFT's MFU against the matmul peak of the
same run (and against the device's spec sheet where it is known), the sampling rate in GB/s
against the run's memory bandwidth, peak host memory, and the markdown rendering (pure
functions of the job list)."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.workloads import nominal_tflops

WORKLOADS = ("W-SFT", "W-GEN", "W-GRPO")
LABELS = {"jaxpost": "jaxpost", "jax": "plain JAX", "tunix": "Tunix", "torch": "torch + HF",
          "trl": "TRL", "jaxpost-beta0": "jaxpost, β = 0 (no reference)",
          "jaxpost-lora": "jaxpost, LoRA r 8 on q/v (reference: the base, adapters off)"}
SPLIT = ("rollout", "reward", "old_logprobs", "reference", "update")
REFERENCE_PEER = "jaxpost"


#: The spread of a probe's per-round values (matmul peak or memory bandwidth: largest over
#: smallest, minus 1) above which the table says that the machine's speed moved.
PEAK_DRIFT = 0.05


def matmul_peak(jobs: list[dict]) -> dict | None:
    """The largest median GFLOP/s over every matmul record of the run (all frameworks,
    sizes and rounds), with where it came from, the best per framework and the best per
    round (`[round, GFLOP/s]` in round order: how the machine's speed moved between
    rounds); and the largest median memory bandwidth (GB/s) of the copy records, where
    the run has them."""
    peak_jobs = [j for j in jobs if j["status"] == "ok" and j["workload"] == "peak"]
    recs = [r for j in peak_jobs for r in j["records"]]
    mm = [r for r in recs if "gflops_median" in r]
    if not mm:
        return None
    best = max(mm, key=lambda r: r["gflops_median"])
    per_fw = _max_by((r["framework"], r["gflops_median"]) for r in mm)
    out = {"gflops": best["gflops_median"], "framework": best["framework"], "n": best["n"],
           "dtype": best.get("dtype", "float32"), "per_framework_gflops": per_fw,
           "per_round_gflops": _best_per_round(peak_jobs, "gflops_median")}
    copies = [r for r in recs if "gbps_median" in r]
    if copies:
        bw = max(copies, key=lambda r: r["gbps_median"])
        out.update(gbps=bw["gbps_median"], gbps_framework=bw["framework"],
                   per_round_gbps=_best_per_round(peak_jobs, "gbps_median"))
    return out


def _max_by(pairs) -> dict:
    """The largest value per group of `(group, value)` pairs."""
    best: dict = {}
    for group, value in pairs:
        best[group] = max(best.get(group, value), value)
    return best


def _best_per_round(peak_jobs: list[dict], key: str) -> list[list]:
    """`[round, the largest value of key in that round's records]`, in round order."""
    best = _max_by((j["round"], r[key]) for j in peak_jobs for r in j["records"] if key in r)
    return [[k, best[k]] for k in sorted(best)]


def _rounds_and_drift(pairs: list[list], fmt: str) -> tuple[str, float]:
    """'; per round: a / b' (empty for one round) and how far the largest value is above
    the smallest (0 for one round)."""
    values = [v for _, v in pairs]
    if len(values) < 2:
        return "", 0.0
    text = "; per round: " + " / ".join(format(v, fmt) for v in values)
    return text, (max(values) / min(values) - 1 if min(values) > 0 else 0.0)


def mfu(flops_per_step: float, seconds_per_step: float, peak_gflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak FLOP/s."""
    return flops_per_step / seconds_per_step / (peak_gflops * 1e9)


def _sampling_rate(s: dict, prefix: str, nbytes: float, seconds: float,
                   peak: dict | None) -> None:
    """Sets s[prefix + "gbps"] and, where the run measured its bandwidth,
    s[prefix + "bandwidth_fraction"]."""
    s[prefix + "gbps"] = nbytes / seconds / 1e9
    if peak and peak.get("gbps"):
        s[prefix + "bandwidth_fraction"] = s[prefix + "gbps"] / peak["gbps"]


def summarize(jobs: list[dict], peak: dict | None = None) -> dict[str, dict[str, dict]]:
    """{workload: {peer: summary}} pooled over rounds: median / min / max over all timed
    iterations of all rounds, tokens/s at the median, per-round medians, the GRPO split
    (median over rounds of each round's phase median), the largest peak RSS of the
    workload's processes and, for W-SFT with a peak, the MFU."""
    out: dict[str, dict[str, dict]] = {}
    for job in jobs:
        if job["status"] != "ok" or job["workload"] == "peak":
            continue
        for rec in job["records"]:
            # A record's `row` (a variant of the peer's workload, e.g. "jaxpost-beta0") is a
            # row of its own; by default the row is the peer.
            slot = out.setdefault(rec["workload"], {}).setdefault(
                rec.get("row", job["peer"]),
                {"times": [], "round_medians": [], "records": [], "rss": []})
            slot["times"] += list(rec["all"])
            slot["round_medians"].append(rec["median"])
            slot["records"].append(rec)
            if job.get("peak_rss_mib") is not None:
                slot["rss"].append(job["peak_rss_mib"])
    summary: dict[str, dict[str, dict]] = {}
    for workload, peers in out.items():
        for peer, slot in peers.items():
            recs, times = slot["records"], slot["times"]
            med = statistics.median(times)
            s: dict[str, Any] = {"median_s": med, "min_s": min(times), "max_s": max(times),
                                 "n": len(times), "rounds": len(recs),
                                 "round_medians_s": slot["round_medians"],
                                 "peak_rss_mib": max(slot["rss"]) if slot["rss"] else None,
                                 "variant": recs[0].get("variant", "")}
            tokens = recs[0].get("tokens_per_iter")
            if tokens:
                s["tokens_per_iter"] = tokens
                s["tokens_per_s"] = tokens / med
            flops = recs[0].get("flops_per_step")
            if flops:
                s["flops_per_step"] = flops
                s["achieved_gflops"] = flops / med / 1e9
                if peak:
                    s["mfu"] = mfu(flops, med, peak["gflops"])
                spec_tflops = nominal_tflops(recs[0].get("device_kind", ""),
                                             recs[0].get("dtype", "float32"))
                if spec_tflops:
                    s["mfu_spec"] = mfu(flops, med, spec_tflops * 1e3)
            for k in SPLIT:
                vals = [r[f"{k}_median"] for r in recs if r.get(f"{k}_median") is not None]
                if vals:
                    s[f"{k}_s"] = statistics.median(vals)
            # Sampling against memory bandwidth: the bytes a call must read (weights once
            # a step, the KV cache so far) per second of the median call / rollout.
            if recs[0].get("decode_bytes"):
                _sampling_rate(s, "", recs[0]["decode_bytes"], med, peak)
            if recs[0].get("rollout_bytes") and s.get("rollout_s"):
                _sampling_rate(s, "rollout_", recs[0]["rollout_bytes"], s["rollout_s"], peak)
            summary.setdefault(workload, {})[peer] = s
    for workload, peers in summary.items():
        ref = peers.get(REFERENCE_PEER)
        for peer, s in peers.items():
            s["ratio"] = ratio(workload, ref, s) if ref else None
    return summary


def ratio(workload: str, ref: dict, peer: dict) -> float:
    """jaxpost against a peer: tokens/s ÷ the peer's (W-SFT, W-GEN; > 1: jaxpost faster),
    s/step ÷ the peer's (W-GRPO; < 1: jaxpost faster)."""
    if workload == "W-GRPO":
        return ref["median_s"] / peer["median_s"]
    return ref["tokens_per_s"] / peer["tokens_per_s"]


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "—" if x is None else format(x, fmt)


def _label(peer: str, s: dict) -> str:
    name = LABELS.get(peer, peer)
    return f"{name} ({s['variant']})" if s.get("variant") else name


def _row_order(row: str, peers: list[str]) -> tuple[int, str]:
    """Rows in the run's peer order, a peer's variants ("jaxpost-beta0") right after it."""
    peer = row.split("-")[0]
    return (peers.index(peer) if peer in peers else 99, "" if row == peer else row)


def _gbps(s: dict, prefix: str) -> str:
    """A sampling rate in GB/s with its fraction of the run's bandwidth in brackets."""
    rate, frac = s.get(prefix + "gbps"), s.get(prefix + "bandwidth_fraction")
    if rate is None:
        return "—"
    return _f(rate, ".1f") + (f" ({frac:.2f})" if frac is not None else "")


def render(result: dict) -> str:
    """The markdown table of a run (`benchmarks.run` result dict)."""
    m, summary, peak = result["machine"], result["summary"], result.get("peak")
    opts = result["options"]
    lines = [f"# Benchmarks {result['started_utc']}", "",
             f"Machine: {m['cpu_model']}, {m['cores']} cores"
             + (f"; device {m['device']}" if m.get("device") else "")
             + f"; load average before {m['loadavg_before']}, after {m['loadavg_after']}.  ",
             f"Command: `{result['command']}`  ",
             f"Model {opts.get('model', 'tiny-llama')}, {opts.get('dtype', 'float32')}; "
             f"jaxpost commit {result['git']}; rounds {opts['rounds']}"
             + ("; **--quick: a smoke test, not a measurement**" if opts['quick'] else ""), ""]
    order = list(opts["peers"])
    any_spec_mfu = any(p.get("mfu_spec") is not None
                       for p in summary.get("W-SFT", {}).values())
    for workload in WORKLOADS:
        peers = summary.get(workload)
        if not peers:
            continue
        grpo, sft = workload == "W-GRPO", workload == "W-SFT"
        spec_mfu = sft and any_spec_mfu
        prefix = "rollout_" if grpo else ""
        rate = any(p.get(prefix + "gbps") is not None for p in peers.values())
        tokens = next(iter(peers.values())).get("tokens_per_iter")
        if grpo:
            lines += [f"## {workload} (s/step, lower is better; {tokens} completion tokens "
                      "per step; ratio = jaxpost's time ÷ the peer's)", "",
                      "| peer | s/step median | min–max | tokens/s | jaxpost ÷ peer (time) "
                      "| rollout s | reward s | reference s | update s |"
                      + (" rollout GB/s (of bandwidth) |" if rate else "")
                      + " peak RSS MiB | n | round medians |",
                      "|---|---|---|---|---|---|---|---|---|" + ("---|" if rate else "")
                      + "---|---|---|"]
        else:
            unit = "s/step" if sft else "s/call"
            lines += [f"## {workload} (tokens/s, higher is better; {tokens} tokens per "
                      f"{unit[2:]}; ratio = jaxpost's tokens/s ÷ the peer's)", "",
                      f"| peer | {unit} median | min–max | tokens/s | jaxpost ÷ peer "
                      f"(tokens/s) |{' MFU |' if sft else ''}"
                      f"{' MFU (spec) |' if spec_mfu else ''}"
                      f"{' GB/s (of bandwidth) |' if rate else ''} "
                      "peak RSS MiB | n | round medians |",
                      "|---|---|---|---|---|" + ("---|" if sft else "")
                      + ("---|" if spec_mfu else "") + ("---|" if rate else "")
                      + "---|---|---|"]
        for peer in sorted(peers, key=lambda p: _row_order(p, order)):
            s = peers[peer]
            row = [_label(peer, s), _f(s["median_s"]), f"{_f(s['min_s'])}–{_f(s['max_s'])}",
                   _f(s.get("tokens_per_s"), ".0f"), _f(s.get("ratio"), ".2f") + "×"
                   if s.get("ratio") is not None else "—"]
            if grpo:
                row += [_f(s.get(f"{k}_s")) for k in ("rollout", "reward", "reference",
                                                        "update")]
                if rate:
                    row.append(_gbps(s, prefix))
            else:
                if sft:
                    row.append(_f(s.get("mfu"), ".2f"))
                if spec_mfu:
                    row.append(_f(s.get("mfu_spec"), ".2f"))
                if rate:
                    row.append(_gbps(s, prefix))
            row += [_f(s.get("peak_rss_mib"), ".0f"), str(s["n"]),
                    " / ".join(_f(x) for x in s["round_medians_s"])]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if peak:
        fw = ", ".join(f"{k} {v:.0f}" for k, v in sorted(peak["per_framework_gflops"].items()))
        per_round, drift = _rounds_and_drift(peak.get("per_round_gflops", []), ".0f")
        bw_rounds, bw_drift = _rounds_and_drift(peak.get("per_round_gbps", []), ".1f")
        moved = [f"matmul {drift:.0%}"] if drift > PEAK_DRIFT else []
        moved += [f"memory bandwidth {bw_drift:.0%}"] if bw_drift > PEAK_DRIFT else []
        lines += [f"{'Float32' if peak['dtype'] == 'float32' else peak['dtype']} matmul peak "
                  "of this run: "
                  f"**{peak['gflops']:.0f} GFLOP/s** "
                  f"({peak['framework']}, n={peak['n']}; best per framework: {fw}{per_round}); "
                  "MFU = W-SFT's model FLOPs per second ÷ this"
                  + ("; MFU (spec) ÷ the device's spec-sheet dense peak" if any_spec_mfu
                     else "")
                  + "."
                  + (f" Memory bandwidth of this run (y = 2x, read + write): "
                     f"**{peak['gbps']:.1f} GB/s** ({peak['gbps_framework']}{bw_rounds}); "
                     "sampling GB/s = the bytes a call must read (every matmul weight once a "
                     "step in the compute dtype, the KV cache so far) ÷ its time, its fraction "
                     "of this in brackets." if peak.get("gbps") else "")
                  + (f" **The machine's speed moved between rounds** ({', '.join(moved)}, "
                     "largest over smallest probe): ratios pooled over the rounds can carry that "
                     "much beside the code; the round medians show each round's own." if moved
                     else ""), ""]
    lines += ["Medians and min–max over every timed iteration of every round (round "
              "medians: each round's own, in round order); tokens/s at "
              "the median; the W-GRPO split is the median over rounds of each round's "
              "phase medians (TRL: reward is inside reference); peak RSS is the largest "
              "of the processes that ran only that workload.", ""]
    for peer, info in result["peers"].items():
        if info["status"] == "not_installed":
            lines.append(f"- {LABELS.get(peer, peer)}: not installed ({info['error']})")
    for job in result["jobs"]:
        if job["status"] == "failed":
            lines.append(f"- {LABELS.get(job['peer'], job['peer'])} {job['workload']} "
                         f"(round {job['round']}): failed: {job['error']}")
    versions = {p: i["versions"] for p, i in result["peers"].items() if i.get("versions")}
    if versions:
        lines += ["", "Versions: " + "; ".join(
            f"{LABELS.get(p, p)}: " + ", ".join(f"{k} {v}" for k, v in vs.items() if v != "")
            for p, vs in versions.items())]
    return "\n".join(lines).rstrip() + "\n"
