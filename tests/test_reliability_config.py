"""Reliability as a user meets it: `python -m jaxpost.train` driven in a subprocess with
tiny configs. Config mistakes are one-line errors with exit status 2; a resumed workdir
refuses a config that would make its checkpoint mean something else; GRPO refuses
configurations that cannot learn; SIGTERM during the GRPO recipe's SFT warm-up exits 0
and the next run resumes the warm-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model and batch small enough that a step takes milliseconds.
TINY_MODEL = [
    "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
    "--config.model.num_layers=1", "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1", "--config.model.head_dim=16",
]
TINY_SFT = [*TINY_MODEL, "--config.data.seq_len=32", "--config.data.batch_size=8",
            "--config.data.num_records=200", "--config.log_every=1", "--config.eval_every=0"]


def run_cli(*args: str, config: str = "configs/sft_demo.py", timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxpost.train", f"--config={config}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line a config error prints (asserting there is nothing else)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ------------------------------------------------------------------ item 8: config errors
@pytest.mark.parametrize("override, expected", [
    ("--config.grpo.lossz=1",
     "error: --config.grpo.lossz: config.grpo.lossz is not a known key; valid keys: beta, "),
    ("--config.grpoo.num_generations=4", "config.grpoo is not a known key; valid keys: "),
    ("--noconfig.grpo.betta", "(did you mean 'beta'?)"),
    ("--config.model.hidden_size.x=3", "config.model.hidden_size is an int, not a section"),
    ("--config.grpo.num_generations=abc", "--config.grpo.num_generations=abc"),
])
def test_a_bad_command_line_override_is_one_line_naming_the_full_key(tmp_path, override,
                                                                     expected):
    proc = run_cli(f"--config.workdir={tmp_path}", override, config="configs/grpo_demo.py")
    line = error_line(proc)
    assert expected in line, line
    if "valid keys" in expected:
        assert "loss_type" in line or "grpo" in line  # the valid keys are listed
    assert not os.listdir(tmp_path)  # nothing was started


def test_a_missing_recipe_file_is_one_line():
    assert "cannot load the recipe" in error_line(run_cli(config="no/such/recipe.py"))


@pytest.mark.parametrize("override, key", [
    ("--config.steps=0", "steps"),
    ("--config.grad_accum_steps=0", "grad_accum_steps"),
    ("--config.eval.num_prompts=0", "config.eval: num_prompts"),
    ("--config.keep_checkpoints=0", "keep_checkpoints"),
])
def test_zero_steps_accumulation_and_eval_prompts_are_rejected_naming_the_key(
        tmp_path, override, key):
    line = error_line(run_cli(f"--config.workdir={tmp_path}", override))
    assert key in line and ">= 1, got 0" in line, line
