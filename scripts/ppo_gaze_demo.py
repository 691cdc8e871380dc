"""Runs configs/ppo_gaze_demo.py with and without GazeDistrib over several seeds; writes a
table (`OUT/table.md`, `OUT/results.json`) and a plot of reward vs step
(`OUT/reward_vs_step.png`), the paper's convergence comparison at toy scale.

    python scripts/ppo_gaze_demo.py --out=/tmp/ppo_gaze_demo --seeds=0,1,2

The SFT warm-up (configs/sft_mention.py) is trained once into OUT/sft_init and every run
starts from it; each run's workdir is OUT/<arm>/seed<N> (run again: finished runs are
read back, not retrained). The reward of a rollout is its mean task reward
(`reward_mean`, logged at each of the rollout's optimizer steps; the first is taken).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARMS = (("last_token", ""), ("gaze", "psycholinguistic"))


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _train(cfg_dict) -> tuple[float, float]:
    """Trains a recipe ConfigDict; returns (CPU seconds of this process, wall seconds)."""
    from jaxpost.train.__main__ import load_config

    cfg, train = load_config(cfg_dict)
    cpu, wall = time.process_time(), time.perf_counter()
    train(cfg)
    return time.process_time() - cpu, time.perf_counter() - wall


def rollout_rewards(workdir: str, steps_per_rollout: int) -> tuple[np.ndarray, np.ndarray]:
    """(optimizer step at each rollout's start, its reward_mean) from metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(x) for x in f]
    first = [r for r in rows if "reward_mean" in r and (r["step"] - 1) % steps_per_rollout == 0]
    return (np.array([r["step"] for r in first]), np.array([r["reward_mean"] for r in first]))


def summarize(curves: dict[str, list[np.ndarray]], last: int = 5) -> dict[str, dict]:
    """Per arm: start reward, final (mean of the last `last` rollouts), and the first
    rollout whose 3-rollout running mean reaches the threshold halfway from the common start
    to the best final mean (NaN if never), each as mean and std over seeds."""
    start = np.mean([c[0] for cs in curves.values() for c in cs])
    finals = {arm: [float(np.mean(c[-last:])) for c in cs] for arm, cs in curves.items()}
    target = start + 0.5 * (max(np.mean(f) for f in finals.values()) - start)
    out = {}
    for arm, cs in curves.items():
        reach = []
        for c in cs:
            smooth = np.convolve(c, np.ones(3) / 3, mode="valid")
            hit = np.flatnonzero(smooth >= target)
            reach.append(float(hit[0] + 3) if hit.size else float("nan"))
        out[arm] = {"start": [float(c[0]) for c in cs], "final": finals[arm],
                    "rollouts_to_half_gain": reach, "target": float(target)}
    return out


def _pm(values) -> str:
    v = np.asarray(values, float)
    if np.all(np.isnan(v)):
        return "never"
    ok = v[~np.isnan(v)]
    text = f"{ok.mean():.3f} ± {ok.std():.3f}" if ok.size > 1 else f"{ok.mean():.3f}"
    return text + (f" ({np.isnan(v).sum()} never)" if np.isnan(v).any() else "")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/ppo_gaze_demo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=0, help="PPO steps (0: the recipe's)")
    ap.add_argument("--sft_steps", type=int, default=0, help="SFT warm-up steps (0: its own)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    timing = {}

    sft = _recipe("sft_mention")
    sft.workdir = os.path.join(args.out, "sft_init")
    if args.sft_steps:
        sft.steps = sft.checkpoint_every = args.sft_steps
    timing["sft_init"] = _train(sft)

    base = _recipe("ppo_gaze_demo")
    k = base.ppo.num_ppo_epochs * base.ppo.num_mini_batches
    curves: dict[str, list[np.ndarray]] = {arm: [] for arm, _ in ARMS}
    steps_of: dict[str, list[np.ndarray]] = {arm: [] for arm, _ in ARMS}
    for arm, predictor in ARMS:
        for seed in seeds:
            cfg = _recipe("ppo_gaze_demo")
            cfg.workdir = os.path.join(args.out, arm, f"seed{seed}")
            cfg.seed = seed
            cfg.model.init_from = sft.workdir
            cfg.ppo.gaze_predictor = predictor
            if args.steps:
                cfg.steps = args.steps
            print(f"== {arm} seed {seed} -> {cfg.workdir}", flush=True)
            timing[f"{arm}/seed{seed}"] = _train(cfg)
            s, r = rollout_rewards(cfg.workdir, k)
            steps_of[arm].append(s)
            curves[arm].append(r)

    summary = summarize(curves)
    target = next(iter(summary.values()))["target"]
    lines = [("| arm | seeds | reward, 1st rollout | reward, last 5 rollouts | rollouts to half "
              f"the gain (target {target:.3f}) | CPU s / run | wall s / run |"),
             "|---|---|---|---|---|---|---|"]
    for arm, _ in ARMS:
        t = np.array([timing[f"{arm}/seed{s}"] for s in seeds])
        lines.append(f"| {arm} | {len(seeds)} | {_pm(summary[arm]['start'])} | "
                     f"{_pm(summary[arm]['final'])} | {_pm(summary[arm]['rollouts_to_half_gain'])} "
                     f"| {t[:, 0].mean():.0f} | {t[:, 1].mean():.0f} |")
    cpu_sft, wall_sft = timing["sft_init"]
    lines.append(f"\nSFT warm-up (once): {cpu_sft:.0f} s CPU, {wall_sft:.0f} s wall. "
                 f"Steps per rollout: {k}.")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"summary": summary, "timing": timing,
                   "curves": {a: [c.tolist() for c in cs] for a, cs in curves.items()},
                   "steps": {a: [s.tolist() for s in ss] for a, ss in steps_of.items()}},
                  f, indent=1)
    _plot(steps_of, curves, os.path.join(args.out, "reward_vs_step.png"))


def _plot(steps_of, curves, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for (arm, _), color in zip(ARMS, ("tab:blue", "tab:orange")):
        n = min(len(c) for c in curves[arm])
        stack = np.stack([c[:n] for c in curves[arm]])
        x = steps_of[arm][0][:n]
        for c in stack:
            ax.plot(x, c, color=color, alpha=0.25, lw=0.8)
        ax.plot(x, stack.mean(0), color=color, lw=2,
                label=f"{arm} (mean of {len(stack)} seeds)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("rollout reward (mention task)")
    ax.set_title("PPO: last-token reward vs GazeDistrib")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
