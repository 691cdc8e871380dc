"""AlignGuard demo, end to end: warm-up alignment SFT, then four fine-tunes on addition,
and the drift table (refusal / answer rates before and after, task accuracy) per arm.

    python scripts/alignguard_demo.py --workdir=/tmp/agl_demo [--arms=full,lora,l2,agl]

Stages and recipes come from `configs/alignguard_demo.py`: the warm-up is trained once
into WORKDIR/warmup; each arm fine-tunes from it into WORKDIR/<arm> (`model.init_from`),
so a rerun reuses finished stages and resumes an interrupted one. Every model is judged
on the same held-out prompts (`jaxpost.data.alignment.drift_prompts`) with the same
sampler and rng (`jaxpost.eval.drift`), and scored on held-out addition (greedy exact
match). Writes WORKDIR/drift.json (everything, with each model's judged completions),
WORKDIR/drift.md (the table) and WORKDIR/drift.png (bar chart); prints the table.
Reports each stage's CPU time (process time: all threads) next to its wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax

from jaxpost import sharding as sh
from jaxpost.checkpoint import latest_run_step, open_run
from jaxpost.config import to_dataclass
from jaxpost.data import alignment
from jaxpost.eval import drift as D
from jaxpost.models import param_shapes
from jaxpost.sampling import Sampler
from jaxpost.train import sft
from jaxpost.train.common import EvalSection, GenerationEval, setup

log = logging.getLogger("alignguard_demo")

RECIPE = os.path.join(ROOT, "configs", "alignguard_demo.py")
ARM_LABELS = {"full": "full fine-tuning", "lora": "LoRA", "l2": "LoRA + L2-to-start",
              "agl": "AlignGuard LoRA"}


def recipe_module():
    spec = importlib.util.spec_from_file_location("alignguard_demo_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _set(cfg, dotted: str, value: Any) -> None:
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


def stage_config(stage: str, workdir: str, warmup_dir: str | None,
                 overrides: dict[str, Any]) -> sft.SFTConfig:
    """The typed SFT config of one stage; arms start from the shared warm-up."""
    cfg = recipe_module().get_config(stage)
    cfg.workdir = workdir
    if warmup_dir is not None:
        cfg.model.init_from = warmup_dir  # the shared warm-up: no WORKDIR/sft_init per arm
        cfg.init_sft_config = ""
        # The script evaluates every model itself (same prompts, sampler and rng).
        cfg.eval_every, cfg.eval_at_start = 0, False
    for key, value in overrides.items():
        _set(cfg, key, value)
    return to_dataclass(sft.SFTConfig, cfg, where=f"alignguard_demo:{stage}")


class Timer:
    """Wall and process CPU seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


class Judges:
    """The drift and task evaluations every model goes through (one sampler, so one
    compilation for all of them)."""

    def __init__(self, cfg: sft.SFTConfig, prompts_per_category: int, task_prompts: int,
                 max_new_tokens: int, seed: int):
        self.tokenizer, self.mesh, self.model_cfg = setup(cfg.model, cfg.mesh,
                                                          cfg.data.tokenizer)
        self.model_cfg = self.model_cfg.replace(lora_scale=0.0, lora_dropout=0.0)
        self.sampler = Sampler(self.model_cfg, self.mesh)
        self.items = alignment.drift_prompts(prompts_per_category, seed=seed)
        self.drift = D.DriftEval(self.sampler, self.tokenizer, self.items,
                                 max_new_tokens=max_new_tokens, seed=seed)
        self.task = GenerationEval(EvalSection(task=cfg.eval.task, num_prompts=task_prompts),
                                   self.model_cfg, self.tokenizer, self.mesh, seed)
        self.task.sampler = self.sampler
        self.abstract = param_shapes(self.model_cfg)
        self.shardings = sh.param_shardings(self.model_cfg, self.mesh)

    def params(self, workdir: str):
        """The latest params of a run, LoRA adapters merged."""
        with open_run(workdir) as run:
            return run.restore_params(self.abstract, self.shardings)

    def __call__(self, params) -> dict[str, Any]:
        metrics, samples = self.drift(params)
        return {"drift": metrics, "samples": samples,
                "task_accuracy": self.task(params, 0)["accuracy"]}


def train_stage(cfg: sft.SFTConfig) -> dict[str, float]:
    """Trains (or resumes) one stage; a stage already at `cfg.steps` is reused with the
    timing of the run that trained it (WORKDIR/<stage>/timing.json)."""
    timing_path = os.path.join(cfg.workdir, "timing.json")
    if latest_run_step(cfg.workdir) == cfg.steps and os.path.exists(timing_path):
        with open(timing_path) as f:
            return {**json.load(f), "reused": True}
    with Timer() as t:
        result = sft.train(cfg)
    if result.preempted:
        raise SystemExit(f"preempted while training {cfg.workdir}; run again to resume")
    out = {"train_wall_s": t.wall, "train_cpu_s": t.cpu,
           "final_loss": float(result.last_metrics.get("loss", float("nan")))}
    with open(timing_path, "w") as f:
        json.dump(out, f)
    return out


def _pct(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def summary_table(report: dict) -> str:
    """Markdown: one row per model (the warm-up first), rates, drops and accuracy."""
    rows = [("| model | refusal rate (unsafe) | answer rate (safe) | safe answered as "
             "trained | refusal drop | answer drop | addition accuracy | train CPU s |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    w = report["warmup"]
    rows.append(f"| aligned warm-up (before) | {_pct(w['drift']['refusal_rate'])} | "
                f"{_pct(w['drift']['answer_rate'])} | "
                f"{_pct(w['drift'].get('reference_rate'))} | | | "
                f"{_pct(w['task_accuracy'])} | {w['train_cpu_s']:.0f} |")
    for arm, r in report["arms"].items():
        c = r["comparison"]
        rows.append(f"| {ARM_LABELS.get(arm, arm)} | {_pct(c['after']['refusal_rate'])} | "
                    f"{_pct(c['after']['answer_rate'])} | "
                    f"{_pct(c['after'].get('reference_rate'))} | {_pct(c['refusal_drop'])} | "
                    f"{_pct(c['answer_drop'])} | {_pct(r['task_accuracy'])} | "
                    f"{r['train_cpu_s']:.0f} |")
    return "\n".join(rows)


def category_table(report: dict) -> str:
    """Markdown: per category, the warm-up's rate and each arm's."""
    arms = list(report["arms"])
    cats = report["warmup"]["drift"]["categories"]
    head = "| category | metric | before | " + " | ".join(ARM_LABELS.get(a, a) for a in arms)
    rows = [head + " |", "|---|---|---:|" + "---:|" * len(arms)]
    for name, c in cats.items():
        metric = "refusal_rate" if c["unsafe"] else "answer_rate"
        after = [_pct(report["arms"][a]["drift"]["categories"][name][metric]) for a in arms]
        rows.append(f"| {name} ({'unsafe' if c['unsafe'] else 'safe'}) | {metric} | "
                    f"{_pct(c[metric])} | " + " | ".join(after) + " |")
    return "\n".join(rows)


def bar_chart(report: dict, path: str) -> None:
    """Grouped bars: refusal rate, answer rate and task accuracy per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = ["before"] + [ARM_LABELS.get(a, a) for a in report["arms"]]
    models = [report["warmup"]] + list(report["arms"].values())
    series = {"refusal rate (unsafe)": [m["drift"]["refusal_rate"] for m in models],
              "answer rate (safe)": [m["drift"]["answer_rate"] for m in models],
              "safe answered as trained": [m["drift"].get("reference_rate", 0.0)
                                           for m in models],
              "addition accuracy": [m["task_accuracy"] for m in models]}
    x = np.arange(len(names))
    width = 0.2
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - 1.5) * width, values, width, label=label)
    ax.set_xticks(x, names, rotation=12)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate")
    ax.set_title("Alignment drift after fine-tuning on addition")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(workdir: str, arms=("full", "lora", "l2", "agl"), *,
             overrides: dict[str, Any] | None = None, prompts_per_category: int = 20,
             task_prompts: int = 200, max_new_tokens: int = 64, seed: int = 0) -> dict:
    """Trains (or reuses) the warm-up and each arm, evaluates all, writes the report.

    Args:
      workdir: where everything goes.
      arms: fine-tuning arms of `configs/alignguard_demo.py`.
      overrides: dotted recipe keys set in every stage (e.g. a tiny model for tests).
      prompts_per_category: held-out drift prompts per alignment category.
      task_prompts: held-out addition prompts.
      max_new_tokens: drift completion budget (the trained replies fit in 64 tokens).
      seed: the prompts' and the sampling seed.

    Returns:
      The report (also written to WORKDIR/drift.json).
    """
    overrides = dict(overrides or {})
    os.makedirs(workdir, exist_ok=True)
    warm_dir = os.path.join(workdir, "warmup")
    warm_cfg = stage_config("warmup", warm_dir, None, overrides)
    log.info("stage warm-up -> %s", warm_dir)
    warm = train_stage(warm_cfg)
    first_arm = stage_config(arms[0], os.path.join(workdir, arms[0]), warm_dir, overrides)
    judges = Judges(first_arm, prompts_per_category, task_prompts, max_new_tokens, seed)
    with Timer() as t:
        warm.update(judges(judges.params(warm_dir)))
    warm["eval_wall_s"], warm["eval_cpu_s"] = t.wall, t.cpu
    report: dict[str, Any] = {"warmup": warm, "arms": {}}
    for arm in arms:
        arm_dir = os.path.join(workdir, arm)
        cfg = stage_config(arm, arm_dir, warm_dir, overrides)
        log.info("stage %s -> %s", arm, arm_dir)
        out = train_stage(cfg)
        with Timer() as t:
            out.update(judges(judges.params(arm_dir)))
        out["eval_wall_s"], out["eval_cpu_s"] = t.wall, t.cpu
        out["comparison"] = D.compare_drift(warm["drift"], out["drift"])
        out["config"] = {"lora_rank": cfg.lora.rank, "lr": cfg.optimizer.lr, "steps": cfg.steps}
        report["arms"][arm] = out
        D.write_drift_report(os.path.join(arm_dir, "drift.json"), out["comparison"],
                             task_accuracy=out["task_accuracy"],
                             task_accuracy_before=warm["task_accuracy"], samples=out["samples"])
    md = (f"{summary_table(report)}\n\nPer category:\n\n{category_table(report)}\n")
    with open(os.path.join(workdir, "drift.md"), "w") as f:
        f.write(md)
    bar_chart(report, os.path.join(workdir, "drift.png"))
    report["cpu_s_total"] = time.process_time()
    D.write_drift_report(os.path.join(workdir, "drift.json"), report)
    print(md)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--arms", default="full,lora,l2,agl")
    parser.add_argument("--prompts_per_category", type=int, default=20)
    parser.add_argument("--task_prompts", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key in every stage (VALUE is a Python literal)")
    args = parser.parse_args(argv)
    import ast

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    arms = tuple(a for a in args.arms.split(",") if a)
    t0, c0 = time.perf_counter(), time.process_time()
    run_demo(args.workdir, arms, overrides=overrides,
             prompts_per_category=args.prompts_per_category, task_prompts=args.task_prompts)
    print(f"total: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU "
          f"({jax.device_count()} device(s))")


if __name__ == "__main__":
    main()
