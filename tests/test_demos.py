"""The shipped recipes do what their docstrings promise (slow: minutes on 2 CPU cores).

Each demo runs as the README runs it, `python -m jaxpost.train --config=configs/<demo>.py`,
on one CPU device of a process with 8 host devices (the set-up these bars were measured
in) and with XLA's default optimisation level: the rest of the suite compiles without
LLVM's optimisations (tests/conftest.py), which moves results by rounding, and where a
demo's accuracy jump lands depends on such rounding (configs/sft_demo.py)."""

import json
import os
import subprocess
import sys

import pytest

from jaxpost.train.common import load_recipe
from tests.cli_testing import ROOT

#: Held-out exact match the SFT demo must reach (chance is about 1/150 for 2-digit sums).
SFT_ACCURACY_BAR = 0.3


def run_demo(name: str, workdir, *overrides: str) -> list[dict]:
    """Runs configs/<name>.py through the CLI; its metrics.jsonl records."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxpost.train", f"--config=configs/{name}.py",
         f"--config.workdir={workdir}", "--config.mesh.num_devices=1", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def evals(records: list[dict]) -> dict[int, float]:
    """Held-out accuracy by step."""
    return {r["step"]: r["eval_accuracy"] for r in records if "eval_accuracy" in r}


@pytest.fixture(scope="module")
def sft_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft_demo")
    return workdir, run_demo("sft_demo", workdir)


@pytest.mark.slow
def test_sft_demo_reaches_its_heldout_accuracy_bar(sft_demo):
    _, records = sft_demo
    accuracy = evals(records)
    assert max(accuracy) == 800 and accuracy[800] >= SFT_ACCURACY_BAR, accuracy


@pytest.mark.slow
def test_grpo_demo_improves_heldout_accuracy_over_its_sft_start(sft_demo, tmp_path):
    sft_workdir, _ = sft_demo
    # The recipe's own start: the SFT demo's step-400 checkpoint (model.init_step).
    assert load_recipe(os.path.join(ROOT, "configs", "grpo_demo.py")).model.init_step == 400
    accuracy = evals(run_demo("grpo_demo", tmp_path, f"--config.model.init_from={sft_workdir}"))
    start = accuracy.pop(0)  # eval_at_start: the SFT params, same prompts and rng
    assert accuracy and accuracy[max(accuracy)] > start, (start, accuracy)
