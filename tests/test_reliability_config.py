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

from tests.cli_testing import ROOT, TINY_SFT


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
     "error: --config.grpo.lossz: config.grpo.lossz is not a known key; valid keys: "),
    ("--config.grpoo.num_generations=4", "config.grpoo is not a known key; valid keys: "),
    ("--noconfig.grpo.betta", "(did you mean 'beta'?)"),
    ("--config.model.hidden_size.x=3", "config.model.hidden_size is an int, not a section"),
    ("--config.grpo.num_generations=abc", "--config.grpo.num_generations=abc"),
    ("--config.grpo.num_generations=1", "config.grpo: num_generations must be >= 2, got 1"),
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


@pytest.mark.parametrize("error", ["KeyError('nope')", "ValueError('bad value')"])
def test_a_recipe_that_raises_is_one_line_naming_the_file_and_error(tmp_path, error):
    recipe = tmp_path / "broken.py"
    recipe.write_text(f"def get_config():\n    raise {error}\n")
    line = error_line(run_cli(config=str(recipe)))
    assert str(recipe) in line and error.split("(")[0] in line, line


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


@pytest.mark.parametrize("config, key", [
    ("configs/sft_demo.py", "data"), ("configs/rm_demo.py", "data"),
    ("configs/grpo_demo.py", "prompts")])
def test_a_malformed_data_line_names_the_config_key_that_skips_it(tmp_path, config, key):
    path = tmp_path / "bad.jsonl"
    good = {"sft": {"prompt": "1+1=", "completion": "2"},
            "data": {"prompt": "q", "chosen": "a", "rejected": "b"},
            "prompts": {"prompt": "1+1=", "answer": "2"}}
    record = good["sft"] if config.endswith("sft_demo.py") else good[key]
    path.write_text(json.dumps(record) + "\n{not json\n")
    proc = run_cli(f"--config.workdir={tmp_path / 'run'}", f"--config.{key}.source={path}",
                   "--config.init_sft_config=" if key == "prompts" else "--config.steps=1",
                   config=config)
    assert proc.returncode != 0
    assert f"{path}:2" in proc.stderr and f"--config.{key}.skip_malformed=True" in proc.stderr


# ------------------------------------------------------ item 2: resume checks the config
def tiny_sft(workdir, *extra: str, steps: int = 2) -> subprocess.CompletedProcess:
    return run_cli(f"--config.workdir={workdir}", f"--config.steps={steps}", *TINY_SFT, *extra)


@pytest.fixture(scope="module")
def trained_sft(tmp_path_factory):
    """A tiny SFT workdir trained for 2 steps (checkpoint at step 2)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    proc = tiny_sft(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def copy_of(workdir, tmp_path):
    import shutil
    shutil.copytree(workdir, tmp_path / "run")
    return tmp_path / "run"


def checkpoint_steps(workdir) -> list[str]:
    return sorted(p for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def test_resume_as_another_model_with_the_same_param_shapes_stops_naming_the_keys(
        trained_sft, tmp_path):
    workdir = copy_of(trained_sft, tmp_path)
    # 2 heads x 16 = 4 heads x 8 and 1 kv head x 16 = 2 x 8: every tensor keeps its
    # shape, so today this restores and trains on as a different model.
    line = error_line(tiny_sft(workdir, "--config.model.num_heads=4", "--config.model.head_dim=8",
                               "--config.model.num_kv_heads=2", steps=3))
    for key in ("model.num_heads: checkpoint 2, now 4", "model.head_dim: checkpoint 16, now 8",
                "model.num_kv_heads: checkpoint 1, now 2", "step 2", str(workdir),
                "--config.allow_config_change="):
        assert key in line, line
    assert checkpoint_steps(workdir) == ["2"]  # nothing was trained or saved


@pytest.mark.parametrize("override, key", [
    ("--config.model.rope_theta=500000.0", "model.rope_theta: checkpoint 10000.0, now 500000.0"),
    ("--config.data.source=synthetic:addition:3", "data.source: checkpoint 'synthetic:addition:2'"),
    ("--config.freeze=('mlp',)", "freeze: checkpoint (), now ('mlp',)"),
    ("--config.lora.rank=4", "lora.rank: checkpoint 0, now 4"),
])
def test_resume_with_a_changed_identity_key_stops_naming_it(trained_sft, tmp_path, override,
                                                            key):
    workdir = copy_of(trained_sft, tmp_path)
    line = error_line(tiny_sft(workdir, override, steps=3))
    assert key in line, line
    assert checkpoint_steps(workdir) == ["2"]


@pytest.mark.slow
def test_resume_may_change_lr_steps_and_numerics_and_keys_it_allows(trained_sft, tmp_path):
    workdir = copy_of(trained_sft, tmp_path)
    proc = tiny_sft(workdir, "--config.optimizer.lr=1e-3", "--config.model.remat_policy=full",
                    "--config.model.rope_theta=20000.0",
                    "--config.allow_config_change=('model.rope_theta',)", steps=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    assert "model.rope_theta=20000.0 (its checkpoint has 10000.0)" in proc.stderr
    steps = [json.loads(x)["step"] for x in open(workdir / "metrics.jsonl")]
    assert steps[-1] == 3
    # The new value is the run's from now on: resuming again needs no allowance.
    proc = tiny_sft(workdir, "--config.model.rope_theta=20000.0", steps=4)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_config_changes_compare_identity_keys_and_model_fields_only():
    import dataclasses

    from jaxpost.models import tiny
    from jaxpost.train.common import _allowed, config_changes
    from jaxpost.train.sft import SFTConfig

    cfg, model = SFTConfig(workdir="w"), tiny("llama", num_layers=1, vocab_size=64)
    stored = {"config": json.loads(json.dumps(dataclasses.asdict(cfg))),
              "model": dataclasses.asdict(model)}
    free = dataclasses.replace(cfg, steps=7, seed=3, optimizer=dataclasses.replace(
        cfg.optimizer, lr=1.0), lora=dataclasses.replace(cfg.lora, targets=("o_proj",)))
    assert config_changes(stored, free, model.replace(dtype="bfloat16", scan_layers=False)) == []
    changed = dataclasses.replace(cfg, trainer="grpo", data=dataclasses.replace(
        cfg.data, tokenizer="/hf/tok"))
    assert config_changes(stored, changed, model.replace(vocab_size=128)) == [
        ("trainer", "sft", "grpo"), ("data.tokenizer", "byte", "/hf/tok"),
        ("model.vocab_size", 64, 128)]
    assert config_changes({}, changed, model) == []  # metadata without a config: no check
    assert _allowed("model.rope_theta", ("model",)) and _allowed("data.source", ("*",))
    assert not _allowed("model.rope_theta", ("model.rope",))


# ------------------------------------------ item 7: SIGTERM during the GRPO SFT warm-up
TINY_SFT_RECIPE = '''
from jaxpost.config import to_config_dict
from jaxpost.train.sft import SFTConfig


def get_config():
    cfg = to_config_dict(SFTConfig())
    cfg.steps = 100000  # long enough to be interrupted; the test's second run shortens it
    cfg.log_every = 1
    cfg.checkpoint_every = 100000
    cfg.eval_every = 0
    for key, value in dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=16).items():
        cfg.model[key] = value
    cfg.data.source = "synthetic:addition:2"
    cfg.data.num_records = 200
    cfg.data.seq_len = 32
    cfg.data.batch_size = 8
    return cfg
'''
TINY_GRPO = [
    "--config.model.init_step=0", "--config.eval_at_start=False", "--config.eval_every=0",
    "--config.log_every=1", "--config.checkpoint_every=1", "--config.prompts.num_records=32",
    "--config.grpo.num_generations=2", "--config.grpo.prompts_per_step=2",
    "--config.grpo.max_completion_length=4", "--config.grpo.beta=0.0",
]


def metrics_steps(path) -> list[int]:
    if not os.path.exists(path):
        return []
    return [json.loads(x)["step"] for x in open(path) if x.strip()]


@pytest.mark.slow
def test_sigterm_in_the_grpo_sft_warm_up_exits_0_and_the_next_run_finishes_it_first(tmp_path):
    recipe = tmp_path / "tiny_sft.py"
    recipe.write_text(TINY_SFT_RECIPE)
    workdir = tmp_path / "grpo"
    args = [sys.executable, "-m", "jaxpost.train", "--config=configs/grpo_demo.py",
            f"--config.workdir={workdir}", f"--config.init_sft_config={recipe}",
            "--config.steps=1", *TINY_GRPO]
    warm_metrics = workdir / "sft_init" / "metrics.jsonl"
    proc = subprocess.Popen([*args, "--config.init_sft_steps=0"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while len(metrics_steps(warm_metrics)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted during the SFT warm-up" in out
    saved = sorted(int(p) for p in os.listdir(workdir / "sft_init" / "checkpoints") if p.isdigit())
    assert len(saved) == 1 and saved[0] >= 3
    assert not (workdir / "checkpoints").exists()  # GRPO did not start from the partial warm-up
    assert metrics_steps(workdir / "metrics.jsonl") == []

    # The next run resumes the warm-up to its (now shorter) end, then runs GRPO from it.
    end = saved[0] + 2
    proc = subprocess.run([*args, f"--config.init_sft_steps={end}"], cwd=ROOT, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"sft_init/checkpoints at step {saved[0]}" in proc.stderr  # resumed, not restarted
    assert metrics_steps(warm_metrics)[-2:] == [end - 1, end]
    assert metrics_steps(workdir / "metrics.jsonl") == [1]
