"""A CPU-sized reproduction of "Scalpel vs Hammer" (arXiv 2507.10616; ALGORITHMS.md §3).

    python scripts/reproduce_rl_vs_sft.py --workdir=/tmp/rl_vs_sft

Stage 0 trains a ~0.85M-parameter Llama on a 50/50 mixture of made-up fact recall
(`jaxpost.data.facts`) and 2-digit addition (`configs/rl_vs_sft_pretrain.py`). From its
last checkpoint, four arms train on addition only with the same number of optimizer steps
and checkpoints: (a) SFT, (b) GRPO (exact-answer reward), (c) SFT with the middle layers'
MLPs frozen (`mid_mlp(1,3)` of 4 layers), (d) SFT of q_proj/k_proj only (`qk_only`).
Every checkpoint (and the start) is evaluated for held-out addition accuracy (greedy, the
in-domain task) and fact recall (greedy exact match on all 300 facts: retention), and
`jaxpost.analysis` measures the weight change, token KL and intruder dimensions of each
arm's trajectory against the start. `WORKDIR/REPORT.md` gathers the plots, the tables,
each stage's wall and CPU time, and which of the seed study's findings reproduced.

Re-running with the same workdir resumes: finished stages are not trained again.
`--pretrain_from=DIR` starts the arms from an existing stage-0 workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PRETRAIN = "configs/rl_vs_sft_pretrain.py"
SFT = "configs/rl_vs_sft_sft.py"
GRPO = "configs/rl_vs_sft_grpo.py"
MID = (1, 3)  # the "mid-layer" MLPs of the 4-layer model: layers 1 and 2
NUM_ENTITIES = 100  # as in the pretrain recipe's source spec
ADDITION_DIGITS = 2


@dataclasses.dataclass(frozen=True)
class Arm:
    """One fine-tuning arm of the study."""

    name: str
    title: str
    config: str
    overrides: tuple[str, ...] = ()


ARMS = (
    Arm("sft", "SFT", SFT),
    Arm("grpo", "GRPO", GRPO),
    Arm("sft_mid_mlp_frozen", f"SFT, MLPs of layers {MID[0]}-{MID[1] - 1} frozen", SFT,
        (f"--config.freeze_preset=mid_mlp({MID[0]},{MID[1]})",)),
    Arm("sft_qk_only", "SFT, q/k only", SFT, ("--config.freeze_preset=qk_only",)),
)


class Clock:
    """Wall and CPU seconds (this process plus finished child processes) per stage."""

    def __init__(self, path: str | None = None):
        self.path = path  # timings.json: stages of earlier invocations are kept
        self.stages: list[tuple[str, float, float]] = []
        if path and os.path.exists(path):
            with open(path) as f:
                self.stages = [tuple(x) for x in json.load(f)]

    @staticmethod
    def _cpu() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def stage(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.t, self.c = time.time(), clock._cpu()

            def __exit__(self, *exc):
                clock.stages = [x for x in clock.stages if x[0] != name]
                clock.stages.append((name, time.time() - self.t, clock._cpu() - self.c))
                if clock.path:
                    with open(clock.path, "w") as f:
                        json.dump(clock.stages, f, indent=1)
                print(f"[{name}] wall {clock.stages[-1][1]:.0f}s, cpu {clock.stages[-1][2]:.0f}s",
                      flush=True)
        return _Stage()


def train(config: str, workdir: str, overrides=()) -> None:
    """Runs (or resumes) a recipe with `python -m jaxpost.train` (as a user would)."""
    cmd = [sys.executable, "-m", "jaxpost.train", f"--config={os.path.join(ROOT, config)}",
           f"--config.workdir={workdir}", *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


class Evaluator:
    """Held-out addition accuracy and fact recall of a checkpoint (greedy decoding)."""

    def __init__(self):
        from jaxpost.data import facts, synthetic
        from jaxpost.tokenizer import load_tokenizer

        self.tok = load_tokenizer("byte")
        self.addition = synthetic.addition_prompts(self.tok, 200, seed=0, split="heldout",
                                                   max_digits=ADDITION_DIGITS)
        self.facts = facts.fact_prompts(self.tok, NUM_ENTITIES)
        self._samplers: dict = {}

    def __call__(self, ref) -> dict[str, float]:
        import jax

        from jaxpost.analysis import loading
        from jaxpost.data.synthetic import exact_match
        from jaxpost.eval.generation import generation_accuracy
        from jaxpost.sampling import Sampler, SamplingConfig

        cfg, params, _ = loading.load(ref)
        key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
        sampler = self._samplers.setdefault(key, Sampler(cfg))
        out = {}
        for name, prompts in (("addition_accuracy", self.addition),
                              ("fact_recall", self.facts)):
            sampling = SamplingConfig(max_new_tokens=10, temperature=0.0,
                                      eos_ids=(self.tok.eos_id,), pad_id=self.tok.pad_id)
            out[name] = generation_accuracy(sampler, params, self.tok, prompts, exact_match,
                                            sampling, batch_size=50,
                                            rng=jax.random.key(0))["accuracy"]
        return out


def write_probe(path: str) -> None:
    """The KL probe: 16 fact questions and 16 held-out sums (chat-templated prompts, the
    base model's greedy-free sampled continuations complete them)."""
    from jaxpost.data import facts, synthetic
    from jaxpost.tokenizer import load_tokenizer

    tok = load_tokenizer("byte")
    prompts = [p["prompt"] for p in facts.fact_prompts(tok, NUM_ENTITIES)[::19][:16]]
    prompts += [p["prompt"] for p in synthetic.addition_prompts(
        tok, 16, seed=123, split="heldout", max_digits=ADDITION_DIGITS)]
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)


# ------------------------------------------------------------------------- findings
def _overall_rel(rows) -> float:
    num = sum(r["abs"] ** 2 for r in rows if r["layer"] is not None)
    den = sum(r["base_norm"] ** 2 for r in rows if r["layer"] is not None)
    return math.sqrt(num / den) if den else math.nan


def _group_rel(rows, modules, layers=None) -> float:
    sel = [r for r in rows if r["layer"] is not None and r["module"] in modules
           and (layers is None or r["layer"] in layers)]
    return _overall_rel(sel)


#: Differences in fact recall (300 facts, ~0.03 binomial noise each) below this count as
#: noise: a verdict needs the difference to exceed it.
RECALL_MARGIN = 0.05


def _margin(smaller: float, larger: float) -> str:
    """Verdict for "`smaller` < `larger`" on recall losses, allowing for noise."""
    if larger - smaller > RECALL_MARGIN:
        return "reproduced"
    if larger - smaller > 0:
        return f"not clearly (difference under {RECALL_MARGIN})"
    return "not reproduced"


MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def findings(final_rows: dict, evals: dict, kl: dict, num_layers: int) -> list[tuple[str, str, str]]:
    """(claim, verdict, the numbers) for each of the seed study's qualitative findings."""
    out = []
    agg = {a: {m: _group_rel(final_rows[a], (m,)) for m in MATRICES} for a in final_rows}

    def top2(a):
        return sorted(MATRICES, key=lambda m: -agg[a][m])[:2]

    ok = all(set(top2(a)) == {"q_proj", "k_proj"} for a in ("sft", "grpo"))
    out.append(("q_proj and k_proj change most, in both SFT and GRPO",
                "reproduced" if ok else "not reproduced",
                "; ".join(f"{a}: top-2 {', '.join(f'{m} {agg[a][m]:.3g}' for m in top2(a))} "
                          f"(of {len(MATRICES)} matrix types)" for a in ("sft", "grpo"))))
    r_sft, r_grpo = _overall_rel(final_rows["sft"]), _overall_rel(final_rows["grpo"])
    ratio = r_sft / r_grpo if r_grpo else math.inf
    out.append(("SFT changes the weights far more than GRPO",
                "reproduced" if ratio >= 2 else ("partly (more, not far more)" if ratio > 1
                                                 else "not reproduced"),
                f"relative change of the layer stack: SFT {r_sft:.3g}, GRPO {r_grpo:.3g} "
                f"(ratio {ratio:.3g})"))
    mid = set(range(*MID))
    outer = set(range(num_layers)) - mid
    mlp_mid, mlp_outer = (_group_rel(final_rows["sft"], MLP, ls) for ls in (mid, outer))
    mlp_ratio = _group_rel(final_rows["sft"], MLP) / max(_group_rel(final_rows["grpo"], MLP), 1e-30)
    attn_ratio = _group_rel(final_rows["sft"], ATTN) / max(_group_rel(final_rows["grpo"], ATTN),
                                                           1e-30)
    both = mlp_mid > mlp_outer and mlp_ratio > attn_ratio
    either = mlp_mid > mlp_outer or mlp_ratio > attn_ratio
    out.append(("SFT's extra change falls on the mid-layer MLPs especially",
                "reproduced" if both else ("partly" if either else "not reproduced"),
                f"SFT MLP change in layers {sorted(mid)} {mlp_mid:.3g} vs layers "
                f"{sorted(outer)} {mlp_outer:.3g}; SFT/GRPO ratio for MLPs {mlp_ratio:.3g} vs "
                f"attention {attn_ratio:.3g}"))
    start = evals["start"]["fact_recall"]
    drop = {a: start - evals[a][-1][1]["fact_recall"] for a in final_rows}
    out.append(("SFT forgets more than GRPO (fact recall lost)",
                _margin(drop["grpo"], drop["sft"]),
                f"recall {start:.3f} at the start; lost: SFT {drop['sft']:.3f}, GRPO "
                f"{drop['grpo']:.3f}"))
    if "sft" in kl and "grpo" in kl:
        out.append(("SFT drifts further from the base than GRPO (token KL)",
                    "reproduced" if kl["sft"] > kl["grpo"] else "not reproduced",
                    f"final mean token KL: SFT {kl['sft']:.3g}, GRPO {kl['grpo']:.3g} nats"))
    acc = {a: evals[a][-1][1]["addition_accuracy"] for a in final_rows}
    for a, what in (("sft_mid_mlp_frozen", "freezing the mid-layer MLPs"),
                    ("sft_qk_only", "training only q/k")):
        out.append((f"{what} limits SFT's forgetting",
                    _margin(drop[a], drop["sft"]),
                    f"recall lost {drop[a]:.3f} vs plain SFT {drop['sft']:.3f}; addition "
                    f"accuracy {acc[a]:.3f} vs plain SFT {acc['sft']:.3f} (start "
                    f"{evals['start']['addition_accuracy']:.3f})"))
    return out


# --------------------------------------------------------------------------- report
def write_report(workdir, arms, evals, result, clock, analysis_dir, started) -> str:
    from jaxpost.analysis import report

    series = {"held-out addition accuracy (greedy)": {}, "fact recall (greedy)": {}}
    for arm in arms:
        for panel, key in zip(series, ("addition_accuracy", "fact_recall")):
            pts = [(0.0, evals["start"][key])] + [(float(s), e[key]) for s, e in evals[arm.name]]
            series[panel][arm.name] = pts
    report.line_panels(os.path.join(workdir, "accuracy.png"), series, "accuracy",
                       "in-domain accuracy and knowledge retention by fine-tuning step")
    final_rows, kl = {}, {}
    for arm in arms:
        last = max(s for s, _ in evals[arm.name])
        label = f"{arm.name}@{last}"
        final_rows[arm.name] = [r for r in result.weights if r["checkpoint"] == label]
        for r in result.kl:
            if r["checkpoint"] == label:
                kl[arm.name] = r["kl_mean"]
    num_layers = 1 + max(r["layer"] for r in result.weights if r["layer"] is not None)
    found = findings(final_rows, evals, kl, num_layers)
    rel = lambda a, mods, ls=None: _group_rel(final_rows[a], mods, ls)
    intr = {a: sum(r["count"] for r in result.intruders if r["eps"] == result_eps(result)
                   and r["checkpoint"] == f"{a}@{max(s for s, _ in evals[a])}")
            for a in final_rows}
    lines = ["# RL vs SFT at CPU scale (a reproduction of \"Scalpel vs Hammer\")", "",
             f"Written by `scripts/reproduce_rl_vs_sft.py` on {time.strftime('%Y-%m-%d %H:%M')}."
             + ("" if started is None else
                f" ({time.time() - started:.0f} s wall in this invocation)."), "",
             "Start: a 4-layer, 0.85M-parameter Llama trained on made-up facts (100 entities "
             "x 3 attributes) mixed 50/50 with 2-digit addition (`configs/rl_vs_sft_pretrain.py`). "
             "Each arm then trains on addition only, for the same number of optimizer steps "
             "(`configs/rl_vs_sft_sft.py`, `configs/rl_vs_sft_grpo.py`): 120 steps, a "
             "checkpoint every 30; SFT at lr 1e-3 on 32 packed rows of 64 tokens per step, "
             "GRPO at lr 1e-4 (the seed study also ran GRPO at a far lower rate than SFT) on "
             "16 prompts x 8 samples per step with an exact-answer reward and beta 0.04. "
             "The frozen arms are SFT with `freeze_preset` `mid_mlp(1,3)` and `qk_only`.", "",
             "## Outcome", "",
             "| arm | addition acc. | fact recall | mean token KL | rel. change (layers) | q | k | "
             "MLP mid layers | MLP outer layers | intruders |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| start | {evals['start']['addition_accuracy']:.3f} | "
             f"{evals['start']['fact_recall']:.3f} | 0 | 0 | 0 | 0 | 0 | 0 | 0 |"]
    mid = set(range(*MID))
    outer = set(range(num_layers)) - mid
    for arm in arms:
        e = evals[arm.name][-1][1]
        lines.append(
            f"| {arm.title} | {e['addition_accuracy']:.3f} | {e['fact_recall']:.3f} | "
            f"{kl.get(arm.name, math.nan):.3g} | {_overall_rel(final_rows[arm.name]):.3g} | "
            f"{rel(arm.name, ('q_proj',)):.3g} | {rel(arm.name, ('k_proj',)):.3g} | "
            f"{rel(arm.name, MLP, mid):.3g} | {rel(arm.name, MLP, outer):.3g} | "
            f"{intr[arm.name]} |")
    lines += ["", f"Relative change = ‖W−W₀‖/‖W₀‖ aggregated over the named tensors of the "
              f"final checkpoint; intruders = intruder dimensions at ε = {result_eps(result):g} "
              "summed over all layer matrices. Accuracy: 200 held-out sums; recall: all 300 facts.",
              "", "## Which of the seed study's findings reproduced", "",
              "| finding (seed study) | here | measured |", "|---|---|---|"]
    lines += [f"| {c} | **{v}** | {n} |" for c, v, n in found]
    lines += ["", "## Trajectories", "", "![accuracy and recall](accuracy.png)", ""]
    rel_dir = os.path.relpath(analysis_dir, workdir)
    for name in ("trajectory_rel.png", "kl.png", "intruders.png"):
        if os.path.exists(os.path.join(analysis_dir, name)):
            lines += [f"![{name}]({rel_dir}/{name})", ""]
    lines += ["## Where each arm changed the model (final checkpoints)", ""]
    for arm in arms:
        last = max(s for s, _ in evals[arm.name])
        name = f"heatmap_rel_{report.file_stem(f'{arm.name}@{last}')}.png"
        lines += [f"**{arm.title}**", "", f"![{arm.name}]({rel_dir}/{name})", ""]
    lines += [f"Full tables and the analysis' own summary: `{rel_dir}/summary.md`, "
              f"`{rel_dir}/weight_change.csv`, `kl.csv`, `intruders.csv`; evaluations: "
              "`evals.json`.", "", "## Time", "",
              "The machine is a shared 2-core CPU; CPU seconds (this process and its "
              "training subprocesses) say what the work costs, wall seconds what it took "
              "here.", "", "| stage | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {n} | {w:.0f} | {c:.0f} |" for n, w, c in clock.stages]
    lines.append(f"| total | {sum(w for _, w, _ in clock.stages):.0f} | "
                 f"{sum(c for _, _, c in clock.stages):.0f} |")
    path = os.path.join(workdir, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def read_result(analysis_dir: str):
    """The `AnalysisResult` rows back from the CSVs `analyze` wrote (for --report_only)."""
    import csv

    from jaxpost.analysis.compare import AnalysisResult

    def num(v):
        if v == "":
            return None
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    def rows(name):
        path = os.path.join(analysis_dir, name)
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [{k: (v if k in ("checkpoint", "series", "module", "side") else num(v))
                     for k, v in r.items()} for r in csv.DictReader(f)]

    return AnalysisResult(rows("weight_change.csv"), rows("kl.csv"), rows("intruders.csv"),
                          [], [])


def result_eps(result) -> float:
    """The loosest ε analysed (0.75 by default): at 0.5 no arm of this study has any."""
    return max(r["eps"] for r in result.intruders) if result.intruders else 0.5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/rl_vs_sft")
    parser.add_argument("--pretrain_from", default="",
                        help="an existing stage-0 workdir (skips training it)")
    parser.add_argument("--report_only", action="store_true",
                        help="rewrite REPORT.md from the evals, CSVs and timings on disk")
    args = parser.parse_args(argv)
    started = time.time()
    os.makedirs(args.workdir, exist_ok=True)
    clock = Clock(os.path.join(args.workdir, "timings.json"))
    analysis_dir = os.path.join(args.workdir, "analysis")
    if args.report_only:
        with open(os.path.join(args.workdir, "evals.json")) as f:
            evals = {k: v if k == "start" else [tuple(x) for x in v]
                     for k, v in json.load(f).items()}
        path = write_report(args.workdir, ARMS, evals, read_result(analysis_dir), clock,
                            analysis_dir, None)
        print(f"wrote {path}")
        return 0
    pretrain = args.pretrain_from or os.path.join(args.workdir, "pretrain")
    if not args.pretrain_from:
        with clock.stage("stage 0: pretrain (facts + addition)"):
            train(PRETRAIN, pretrain)
    for arm in ARMS:
        with clock.stage(f"train {arm.name}"):
            train(arm.config, os.path.join(args.workdir, arm.name),
                  (f"--config.model.init_from={pretrain}", *arm.overrides))

    from jaxpost.analysis import AnalysisOptions, analyze, loading

    evals: dict = {}
    with clock.stage("evaluate every checkpoint"):
        evaluate = Evaluator()
        evals["start"] = evaluate(loading.resolve(pretrain)[0])
        print("start", evals["start"], flush=True)
        for arm in ARMS:
            evals[arm.name] = []
            for ref in loading.resolve(os.path.join(args.workdir, arm.name) + "@all"):
                evals[arm.name].append((ref.step, evaluate(ref)))
                print(ref.label, evals[arm.name][-1][1], flush=True)
    with open(os.path.join(args.workdir, "evals.json"), "w") as f:
        json.dump(evals, f, indent=1)
    probe = os.path.join(args.workdir, "probe.jsonl")
    write_probe(probe)
    with clock.stage("analysis (weights, KL, intruders, plots)"):
        result = analyze(pretrain, [os.path.join(args.workdir, a.name) + "@all" for a in ARMS],
                         analysis_dir, AnalysisOptions(probe=probe, probe_tokens=12))
    path = write_report(args.workdir, ARMS, evals, result, clock, analysis_dir, started)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
