"""GRPO with and without gaze token credit on the mention task, over several seeds.

    python scripts/grpo_gaze_demo.py --workdir=/tmp/grpo_gaze_demo [--seeds=0,1,2]

Trains the SFT warm-up once (configs/sft_mention.py), then one GRPO run per seed and arm
(configs/grpo_gaze_demo.py; arms: `plain` = sequence advantage on every token, `gaze` =
GazeDistrib weights from the psycholinguistic predictor, `weighted` mode, `gaze_rtg` =
the same weights as a reward-to-go, `gaze_t2` = `gaze` at softmax temperature 2).
Every run is `python -m jaxpost.train` in its own workdir, so a stopped script resumes
(a finished run is skipped and keeps its wall time). It writes, under `--out` (default
WORKDIR/results): `results.json` (per run: reward curve, steps to the threshold, final reward, wall time),
`results.md` (the table: mean and std over seeds) and `learning_curves.png`.

Steps to threshold: the first step at which the reward, averaged over the last
`--window` steps, reaches `--threshold` (runs that never do count as not reached and are
left out of the mean, which is then marked). Final reward: the mean over the last
`--window` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs.grpo_gaze_demo import GAZE_CREDIT  # noqa: E402

ARMS = {
    "plain": [],
    "gaze": [f"--config.token_credit={GAZE_CREDIT}", "--config.token_credit_mode=weighted"],
    "gaze_rtg": [f"--config.token_credit={GAZE_CREDIT}",
                 "--config.token_credit_mode=reward_to_go"],
    "gaze_t2": ["--config.token_credit=" + GAZE_CREDIT.replace("temperature=1.0",
                                                                "temperature=2.0"),
                "--config.token_credit_mode=weighted"],
}


def _train(args: list[str], log_path: str) -> float:
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.run([sys.executable, "-m", "jaxpost.train", *args], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise SystemExit(f"training failed ({proc.returncode}); see {log_path}")
    return time.perf_counter() - t0


def _rewards(workdir: str, steps: int) -> np.ndarray:
    by_step = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "reward_mean" in rec:
                by_step[int(rec["step"])] = float(rec["reward_mean"])
    missing = [s for s in range(1, steps + 1) if s not in by_step]
    if missing:
        raise SystemExit(f"{workdir}/metrics.jsonl lacks reward_mean of steps {missing[:5]}...")
    return np.array([by_step[s] for s in range(1, steps + 1)])


def _smooth(r: np.ndarray, window: int) -> np.ndarray:
    c = np.cumsum(np.insert(r, 0, 0.0))
    idx = np.arange(1, len(r) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def summarise(runs: dict, threshold: float, window: int) -> dict:
    """Per arm: steps to threshold and final reward, mean / std over seeds."""
    table = {}
    for arm, seeds in runs.items():
        reached = [r["steps_to_threshold"] for r in seeds.values()]
        hit = [x for x in reached if x is not None]
        finals = [r["final_reward"] for r in seeds.values()]
        table[arm] = {
            "seeds": len(seeds), "reached": len(hit),
            "steps_to_threshold_mean": float(np.mean(hit)) if hit else None,
            "steps_to_threshold_std": float(np.std(hit)) if hit else None,
            "final_reward_mean": float(np.mean(finals)), "final_reward_std": float(np.std(finals)),
            "initial_reward_mean": float(np.mean([r["rewards"][0] for r in seeds.values()])),
            "wall_s_mean": float(np.mean([r["wall_s"] for r in seeds.values()])),
        }
    return table


def _markdown(table: dict, runs: dict, threshold: float, window: int, steps: int) -> str:
    lines = [f"Mention task, {steps} GRPO steps per run; threshold {threshold} on the "
             f"{window}-step moving average of `reward_mean`; mean ± std over seeds.", "",
             "| arm | seeds reaching threshold | steps to threshold | final reward "
             f"(last {window} steps) | reward at step 1 |",
             "|---|---|---|---|---|"]
    for arm, t in table.items():
        steps_txt = ("never" if t["steps_to_threshold_mean"] is None else
                     f"{t['steps_to_threshold_mean']:.1f} ± {t['steps_to_threshold_std']:.1f}")
        lines.append(f"| {arm} | {t['reached']}/{t['seeds']} | {steps_txt} | "
                     f"{t['final_reward_mean']:.3f} ± {t['final_reward_std']:.3f} | "
                     f"{t['initial_reward_mean']:.3f} |")
    lines += ["", "Per seed (steps to threshold / final reward):", ""]
    for arm, seeds in runs.items():
        cells = ", ".join(f"seed {s}: {r['steps_to_threshold']} / {r['final_reward']:.3f}"
                          for s, r in seeds.items())
        lines.append(f"- {arm}: {cells}")
    return "\n".join(lines) + "\n"


def _plot(runs: dict, threshold: float, window: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, seeds in runs.items():
        curves = np.stack([_smooth(np.array(r["rewards"]), window) for r in seeds.values()])
        x = np.arange(1, curves.shape[1] + 1)
        mean, std = curves.mean(0), curves.std(0)
        ax.plot(x, mean, label=f"{arm} ({len(seeds)} seeds)")
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.axhline(threshold, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(f"reward_mean ({window}-step moving average)")
    ax.set_title("Mention task: GRPO with and without gaze token credit")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/grpo_gaze_demo")
    p.add_argument("--out", default="", help="results folder (default WORKDIR/results)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default="plain,gaze", help=f"comma-separated, of {sorted(ARMS)}")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--sft_steps", type=int, default=0, help="0: the SFT recipe's own")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--window", type=int, default=5)
    a = p.parse_args(argv)
    arms = [x for x in a.arms.split(",") if x]
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; expected some of {sorted(ARMS)}")
    seeds = [int(s) for s in a.seeds.split(",") if s]
    out = a.out or os.path.join(a.workdir, "results")
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()

    sft = os.path.join(a.workdir, "sft")
    sft_args = [f"--config={ROOT}/configs/sft_mention.py", f"--config.workdir={sft}"]
    if a.sft_steps:
        sft_args.append(f"--config.steps={a.sft_steps}")
    print(f"SFT warm-up -> {sft}", flush=True)
    sft_wall = _train(sft_args, os.path.join(a.workdir, "sft.log"))

    runs: dict = {arm: {} for arm in arms}
    for seed in seeds:
        for arm in arms:
            wd = os.path.join(a.workdir, f"{arm}_seed{seed}")
            os.makedirs(wd, exist_ok=True)
            done = os.path.join(wd, "done.json")  # a finished run keeps its wall time
            finished = {}
            if os.path.exists(done):
                with open(done) as f:
                    finished = json.load(f)
            if finished.get("steps") == a.steps:
                wall = finished["wall_s"]
                print(f"GRPO {arm} seed {seed}: done ({wd})", flush=True)
            else:
                print(f"GRPO {arm} seed {seed} -> {wd}", flush=True)
                wall = _train([f"--config={ROOT}/configs/grpo_gaze_demo.py",
                               f"--config.workdir={wd}", f"--config.seed={seed}",
                               f"--config.steps={a.steps}", f"--config.model.init_from={sft}",
                               *ARMS[arm]], os.path.join(wd, "train.log"))
                with open(done, "w") as f:
                    json.dump({"steps": a.steps, "wall_s": wall}, f)
            r = _rewards(wd, a.steps)
            sm = _smooth(r, a.window)
            hit = np.flatnonzero(sm >= a.threshold)
            runs[arm][seed] = {
                "rewards": r.tolist(), "wall_s": wall,
                "steps_to_threshold": int(hit[0]) + 1 if hit.size else None,
                "final_reward": float(r[-a.window:].mean())}
    table = summarise(runs, a.threshold, a.window)
    result = {"threshold": a.threshold, "window": a.window, "steps": a.steps,
              "seeds": seeds, "arms": arms, "gaze_credit": GAZE_CREDIT, "table": table,
              "runs": {arm: {str(s): r for s, r in v.items()} for arm, v in runs.items()},
              "sft_wall_s": sft_wall, "total_wall_s": time.perf_counter() - t_start}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = _markdown(table, runs, a.threshold, a.window, a.steps)
    md += f"\nWall time: {result['total_wall_s'] / 60:.1f} min in all (SFT {sft_wall / 60:.1f} min).\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    _plot(runs, a.threshold, a.window, os.path.join(out, "learning_curves.png"))
    print(md)
    return result


if __name__ == "__main__":
    main()
