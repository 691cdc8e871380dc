"""Writes the Colab notebooks of this folder from the cell sources below.

    python colab/make_notebooks.py          # rewrites colab/*.ipynb (outputs empty)

The notebooks share their set-up cells (find or install jaxpost, show the devices), so
they are generated from one place; edit the cells here, not in the .ipynb files.
tests/test_notebooks.py checks that the committed notebooks match this script and runs
each of them headless on CPU with tiny parameters.
"""

from __future__ import annotations

import os
import sys

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))

#: The repository the Colab set-up cell clones when it is not run inside a checkout.
REPO_URL = "https://github.com/jaxpost/jaxpost"

SETUP = f'''\
# jaxpost: a checkout above this notebook (or CI's) is used as it is; otherwise (Colab)
# the repository is cloned and the requirements of this runtime's accelerator installed.
import os
import shutil
import subprocess
import sys

REPO_URL = "{REPO_URL}"


def checkout_root(path):
    """The first folder at or above `path` holding jaxpost/ and configs/, or None."""
    path = os.path.abspath(path)
    while not (os.path.isfile(os.path.join(path, "jaxpost", "__init__.py"))
               and os.path.isdir(os.path.join(path, "configs"))):
        if os.path.dirname(path) == path:
            return None
        path = os.path.dirname(path)
    return path


ROOT = checkout_root(os.getcwd())
if ROOT is None:
    ROOT = "/content/jaxpost"
    if not os.path.isdir(ROOT):
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, ROOT], check=True)
    tpu_env = any(k in os.environ for k in ("TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR"))
    if os.path.exists("/dev/accel0") or tpu_env:
        requirements = "requirements-tpu.txt"
    elif shutil.which("nvidia-smi"):
        requirements = "requirements-gpu.txt"
    else:
        requirements = "requirements.txt"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r",
                    os.path.join(ROOT, requirements)], check=True)
os.chdir(ROOT)  # recipes and scripts are named relative to the repository root
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
print("jaxpost from", ROOT)'''

DEVICES = '''\
import jax

print(jax.default_backend(), jax.devices())
ACCELERATOR = jax.default_backend() in ("tpu", "gpu")  # picks the larger defaults below'''

METRICS = '''\
import json

import matplotlib.pyplot as plt


def read_metrics(workdir, key):
    """(steps, values) of `key` in a run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]'''

RECIPE = '''\
from jaxpost.train.__main__ import load_config
from jaxpost.train.common import load_recipe


def run_recipe_file(path, workdir, overrides):
    """Trains (or resumes) a recipe of configs/ with dotted-key overrides, as
    `python -m jaxpost.train --config=PATH --config.KEY=VALUE` does."""
    cfg = load_recipe(path)
    cfg.workdir = workdir
    cfg.update_from_flattened_dict(dict(overrides))
    config, train = load_config(cfg)
    return train(config)'''


def md(text: str):
    return v4.new_markdown_cell(text.strip("\n"))


def code(text: str, tags=()):
    cell = v4.new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params(text: str):
    return code(text, tags=("parameters",))


def preamble(title: str, intro: str, parameters: str) -> list:
    return [
        md(f"# {title}\n\n{intro}"),
        md("**Parameters** (papermill's `parameters` cell). `None` picks the default of "
           "the runtime: small on a CPU, larger on a TPU or GPU."),
        params(parameters),
        md("**Set-up.** Uses the checkout this notebook is in, or clones and installs "
           "jaxpost (on Colab: *Runtime → Change runtime type → TPU* or *GPU* first; "
           "JAX picks the accelerator up by itself)."),
        code(SETUP),
        code(DEVICES),
    ]


NOTEBOOKS = {}

NOTEBOOKS["sft"] = preamble(
    "SFT: a small Llama learns 2-digit addition",
    "Supervised fine-tuning with the `configs/sft_demo.py` recipe (a ~1M-parameter Llama, "
    "the byte tokenizer, a generated addition task: nothing is downloaded), then held-out "
    "exact-match accuracy with greedy decoding.",
    '''\
WORKDIR = "/tmp/jaxpost_colab/sft"
STEPS = None      # None: 400 on a CPU (a few minutes), the recipe's 800 on a TPU/GPU
EVAL_PROMPTS = 200
OVERRIDES = {}    # any dotted recipe key, e.g. {"model.num_layers": 2}''') + [
    md("**Train.** `run_recipe_file` is what `python -m jaxpost.train "
       "--config=configs/sft_demo.py` does; a rerun resumes from the last checkpoint. "
       "Accuracy jumps between steps ~400 and ~800 (README, \"Training\")."),
    code(RECIPE),
    code('''\
steps = STEPS or (800 if ACCELERATOR else 400)
result = run_recipe_file("configs/sft_demo.py", WORKDIR, {
    "steps": steps, "eval_every": steps, "checkpoint_every": steps,
    "eval.num_prompts": EVAL_PROMPTS, **OVERRIDES})'''),
    md("**Loss curve** from the run's `metrics.jsonl`."),
    code(METRICS),
    code('''\
x, loss = read_metrics(WORKDIR, "loss")
plt.plot(x, loss)
plt.xlabel("step"), plt.ylabel("train loss"), plt.title("SFT on 2-digit addition")
plt.show()'''),
    md("**Held-out accuracy** (greedy exact match; chance is under 0.01)."),
    code('''\
accuracy = result.eval_metrics["eval_accuracy"]
print(f"eval_accuracy = {accuracy:.3f} after {steps} steps")'''),
]

NOTEBOOKS["grpo"] = preamble(
    "GRPO: exact-answer rewards on top of SFT",
    "Two stages: an SFT warm-up on addition (`configs/sft_demo.py`), then GRPO with the "
    "exact-answer reward (`configs/grpo_demo.py`, `jaxpost.rl.rewards:exact_answer`). "
    "Accuracy is avg@4 of sampled completions on held-out prompts, before and after GRPO.",
    '''\
WORKDIR = "/tmp/jaxpost_colab/grpo"
SFT_STEPS = None   # None: 400 (GRPO then has accuracy left to gain)
STEPS = None       # None: 40 GRPO steps on a CPU, the recipe's 80 on a TPU/GPU
EVAL_PROMPTS = 200
OVERRIDES = {}       # dotted keys set in both stages (model shape keys must agree)
SFT_OVERRIDES = {}   # dotted keys of the SFT stage only, e.g. {"data.batch_size": 16}
GRPO_OVERRIDES = {}  # dotted keys of the GRPO stage only, e.g. {"grpo.num_generations": 4}''') + [
    code(RECIPE),
    md("**Stage 1: SFT warm-up** (skipped on a rerun: the finished run is found done)."),
    code('''\
sft_steps = SFT_STEPS or 400
sft_dir = os.path.join(WORKDIR, "sft")
run_recipe_file("configs/sft_demo.py", sft_dir, {
    "steps": sft_steps, "checkpoint_every": sft_steps, "eval_every": 0, **OVERRIDES,
    **SFT_OVERRIDES})'''),
    md("**Stage 2: GRPO** from the warm-up's last checkpoint (`model.init_from`); "
       "`eval_at_start` scores the SFT model on the same prompts and rng first."),
    code('''\
steps = STEPS or (80 if ACCELERATOR else 40)
result = run_recipe_file("configs/grpo_demo.py", os.path.join(WORKDIR, "grpo"), {
    "model.init_from": sft_dir, "model.init_step": 0, "steps": steps,
    "checkpoint_every": steps, "eval_every": steps, "eval.num_prompts": EVAL_PROMPTS,
    **OVERRIDES, **GRPO_OVERRIDES})'''),
    md("**Mean reward per GRPO step** (fraction of exactly right sampled answers)."),
    code(METRICS),
    code('''\
x, reward = read_metrics(os.path.join(WORKDIR, "grpo"), "reward_mean")
plt.plot(x, reward)
plt.xlabel("GRPO step"), plt.ylabel("reward_mean"), plt.title("GRPO on addition")
plt.show()'''),
    md("**Held-out accuracy before and after GRPO.**"),
    code('''\
before = result.start_eval_metrics["eval_accuracy"]
after = result.eval_metrics["eval_accuracy"]
print(f"eval_accuracy = {after:.3f} (SFT start {before:.3f}, {steps} GRPO steps)")'''),
]

NOTEBOOKS["grpo_gaze"] = preamble(
    "Gaze-weighted GRPO (GazeDistrib token credit)",
    "GRPO on the mention task with and without gaze token credit: the `gaze` arm spreads "
    "each sequence's advantage over its tokens by the weights of the psycholinguistic "
    "gaze predictor (`jaxpost.rl.gaze:gaze_credit`). Runs `scripts/grpo_gaze_demo.py` "
    "(one SFT warm-up, then one `python -m jaxpost.train` run per seed and arm).",
    '''\
WORKDIR = "/tmp/jaxpost_colab/grpo_gaze"
ARMS = "plain,gaze"  # of plain, gaze, gaze_rtg, gaze_t2
SEEDS = None         # None: "0" on a CPU, "0,1,2" on a TPU/GPU
STEPS = 60           # GRPO steps per run
SFT_STEPS = 0        # 0: the warm-up recipe's own 400
THRESHOLD = 0.8      # reward (moving average) that counts as "reached"
WINDOW = 5           # moving-average window, steps''') + [
    md("**Run the demo.** Finished runs are skipped on a rerun."),
    code('''\
from scripts import grpo_gaze_demo

seeds = SEEDS or ("0,1,2" if ACCELERATOR else "0")
result = grpo_gaze_demo.main([
    f"--workdir={WORKDIR}", f"--arms={ARMS}", f"--seeds={seeds}",
    f"--steps={STEPS}", f"--sft_steps={SFT_STEPS}", f"--threshold={THRESHOLD}",
    f"--window={WINDOW}"])'''),
    md("**Learning curves** (mean ± std over seeds of the moving-average reward)."),
    code('''\
from IPython.display import Image, display

display(Image(os.path.join(WORKDIR, "results", "learning_curves.png")))'''),
    md("**Final reward per arm** (mean of the last `WINDOW` steps, over seeds)."),
    code('''\
for arm, row in result["table"].items():
    print(f"{arm}: final_reward = {row['final_reward_mean']:.3f} "
          f"(reached {THRESHOLD} in {row['reached']}/{row['seeds']} seeds)")'''),
]

NOTEBOOKS["alignguard"] = preamble(
    "AlignGuard LoRA and the alignment-drift table",
    "Does fine-tuning on an unrelated task (addition) erode a model's refusals? A small "
    "Llama is first aligned (refuse unsafe requests, answer safe ones), then fine-tuned "
    "on addition by full fine-tuning, LoRA, LoRA + L2-to-start or AlignGuard LoRA; "
    "`jaxpost.eval.drift` judges every model on the same held-out prompts. Runs "
    "`scripts/alignguard_demo.py`'s `run_demo`.",
    '''\
WORKDIR = "/tmp/jaxpost_colab/alignguard"
ARMS = None               # None: ("lora", "agl") on a CPU, all four on a TPU/GPU
PROMPTS_PER_CATEGORY = 20  # held-out drift prompts per alignment category
TASK_PROMPTS = 200         # held-out addition prompts
MAX_NEW_TOKENS = 64        # the trained replies fit in 64 tokens
OVERRIDES = {}             # dotted recipe keys set in every stage''') + [
    md("**Train the warm-up and each arm, judge them all** (finished stages are reused)."),
    code('''\
from scripts import alignguard_demo

arms = ARMS or (("full", "lora", "l2", "agl") if ACCELERATOR else ("lora", "agl"))
report = alignguard_demo.run_demo(
    WORKDIR, tuple(arms), overrides=OVERRIDES, prompts_per_category=PROMPTS_PER_CATEGORY,
    task_prompts=TASK_PROMPTS, max_new_tokens=MAX_NEW_TOKENS)'''),
    md("**The drift table** (also in `WORKDIR/drift.md`) and its chart."),
    code('''\
from IPython.display import Image, Markdown, display

with open(os.path.join(WORKDIR, "drift.md")) as f:
    display(Markdown(f.read()))
display(Image(os.path.join(WORKDIR, "drift.png")))'''),
    md("**Per arm:** how much the refusal rate on unsafe prompts dropped, and the task "
       "accuracy bought with it."),
    code('''\
for arm, r in report["arms"].items():
    print(f"{alignguard_demo.ARM_LABELS[arm]}: refusal_drop = "
          f"{r['comparison']['refusal_drop']:.3f}, task_accuracy = {r['task_accuracy']:.3f}")'''),
]

NOTEBOOKS["rl_vs_sft"] = preamble(
    "What did training change? RL vs SFT (\"Scalpel vs Hammer\")",
    "A CPU-sized version of `scripts/reproduce_rl_vs_sft.py`: a small Llama is pretrained "
    "on facts + addition, then fine-tuned on addition by SFT and by GRPO with the same "
    "steps. `jaxpost.analysis` measures, against the start, each arm's weight change per "
    "(layer, module), token KL on a probe set and intruder dimensions, and plots them.",
    '''\
WORKDIR = "/tmp/jaxpost_colab/rl_vs_sft"
ARMS = None           # None: ("sft", "grpo") on a CPU, all four arms on a TPU/GPU
PRETRAIN_STEPS = None    # None: 300 on a CPU, the recipe's 1000 on a TPU/GPU
ARM_STEPS = None         # None: 60 on a CPU, the recipes' 120 on a TPU/GPU
CHECKPOINT_EVERY = None  # None: 20 on a CPU, the recipes' 30 on a TPU/GPU (plot points)
OVERRIDES = {}         # dotted keys set in every stage (e.g. a smaller model)
SFT_OVERRIDES = {}     # dotted keys of the SFT stages only (pretrain and the SFT arms)
GRPO_OVERRIDES = {}    # dotted keys of the GRPO arm only''') + [
    md("**Stage 0: pretrain**, then **each arm** from it, with the script's recipes and "
       "`train` (each is `python -m jaxpost.train`; finished runs are found done)."),
    code('''\
from scripts import reproduce_rl_vs_sft as study

arms = [a for a in study.ARMS if a.name in (ARMS or (
    [a.name for a in study.ARMS] if ACCELERATOR else ("sft", "grpo")))]


def flags(overrides):
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def steps(n):
    return {"steps": n} if n else {}  # 0: the recipe's own


pretrain = os.path.join(WORKDIR, "pretrain")
study.train(study.PRETRAIN, pretrain, flags({
    **steps(PRETRAIN_STEPS or (0 if ACCELERATOR else 300)), **OVERRIDES, **SFT_OVERRIDES}))
for arm in arms:
    study.train(arm.config, os.path.join(WORKDIR, arm.name), [
        f"--config.model.init_from={pretrain}", *arm.overrides, *flags({
            **steps(ARM_STEPS or (0 if ACCELERATOR else 60)),
            "checkpoint_every": CHECKPOINT_EVERY or (30 if ACCELERATOR else 20), **OVERRIDES,
            **(GRPO_OVERRIDES if arm.name == "grpo" else SFT_OVERRIDES)})])'''),
    md("**Task accuracy and retention** of the start and each arm's last checkpoint "
       "(greedy: held-out addition, recall of all 300 facts)."),
    code('''\
from jaxpost.analysis import AnalysisOptions, analyze, resolve

evaluate = study.Evaluator()
evals = {"start": evaluate(resolve(pretrain)[0])}
for arm in arms:
    evals[arm.name] = evaluate(resolve(os.path.join(WORKDIR, arm.name))[0])
for name, e in evals.items():
    print(f"{name}: addition {e['addition_accuracy']:.3f}, fact recall {e['fact_recall']:.3f}")'''),
    md("**The analysis** (`jaxpost.analysis.analyze`, as `python -m jaxpost.analyze` "
       "runs it): CSVs, plots and `summary.md` under `WORKDIR/analysis`."),
    code('''\
probe = os.path.join(WORKDIR, "probe.jsonl")
study.write_probe(probe)
analysis = analyze(pretrain, [os.path.join(WORKDIR, a.name) + "@all" for a in arms],
                   os.path.join(WORKDIR, "analysis"),
                   AnalysisOptions(probe=probe, probe_tokens=12))'''),
    code('''\
from IPython.display import Image, display

for path in analysis.files:
    if path.endswith(".png"):
        print(os.path.basename(path))
        display(Image(path))'''),
    md("**Overall relative weight change** of each arm's last checkpoint "
       "(‖ΔW‖/‖W₀‖ over the layer stack) and its mean token KL to the start."),
    code('''\
for arm in arms:
    rows = [r for r in analysis.weights if r["series"] == arm.name]
    step = max(r["step"] for r in rows)
    kl = [r["kl_mean"] for r in analysis.kl if r["series"] == arm.name and r["step"] == step]
    print(f"{arm.title}: relative_weight_change = "
          f"{study._overall_rel([r for r in rows if r['step'] == step]):.4f}, "
          f"mean_kl = {kl[0]:.4f} (step {step})")'''),
]


def build(name: str) -> nbformat.NotebookNode:
    nb = v4.new_notebook(cells=NOTEBOOKS[name])
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                  "language": "python"},
                   "language_info": {"name": "python"},
                   "accelerator": "TPU", "colab": {"provenance": []}}
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name}-{i}"
    return nb


def main() -> None:
    for name in NOTEBOOKS:
        path = os.path.join(HERE, f"{name}.ipynb")
        nbformat.write(build(name), path)
        print("wrote", os.path.relpath(path), file=sys.stderr)


if __name__ == "__main__":
    main()
