"""The training loop end to end: CLI, resume, preemption, bad input, NaN stop, export."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxpost.config import ConfigError, to_config_dict
from jaxpost.train.__main__ import load_config
from jaxpost.train.loop import NonFiniteLossError
from jaxpost.train.sft import SFTConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A model and batch small enough that a step takes milliseconds.
SMALL = [
    "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
    "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
    "--config.model.head_dim=16", "--config.data.seq_len=32", "--config.data.batch_size=8",
    "--config.data.num_records=500", "--config.log_every=1", "--config.eval_every=0",
]


def small_config(workdir, **top):
    cfg = to_config_dict(SFTConfig())
    cfg.workdir = str(workdir)
    for flag in SMALL:
        key, value = flag[len("--config."):].split("=")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value)
    for k, v in top.items():
        cfg[k] = v
    return cfg


def cli(workdir, *extra, steps=12, **kw):
    cmd = [sys.executable, "-m", "jaxpost.train", "--config=configs/sft_demo.py",
           f"--config.workdir={workdir}", f"--config.steps={steps}", *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


def final_params(workdir):
    from jaxpost.checkpoint import Checkpointer, params_from_state
    with Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        state, _ = ckpt.restore(ckpt.latest_step())
        return ckpt.latest_step(), jax.device_get(params_from_state(state))


def test_unknown_key_and_wrong_type_name_the_key(tmp_path):
    cfg = small_config(tmp_path)
    cfg.unlock()
    cfg.optimizer.lrr = 0.1
    with pytest.raises(ConfigError, match=r"optimizer\.lrr.*did you mean 'lr'"):
        load_config(cfg)
    raw = small_config(tmp_path).to_dict()
    raw["data"]["seq_len"] = "long"  # ConfigDict itself refuses this; a dict does not
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        load_config(raw)
    cfg = small_config(tmp_path)
    cfg.trainer = "ppo"
    with pytest.raises(ConfigError, match="valid trainers"):
        load_config(cfg)


def test_cli_reports_a_bad_key_and_exits_nonzero(tmp_path):
    proc = cli(tmp_path, "--config.optimizer.warmup=3")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "warmup" in out


def test_nan_loss_stops_with_the_step_named_and_no_checkpoint_of_it(tmp_path, monkeypatch):
    import jaxpost.train.sft as sft

    original_next = sft.SFTTask.next_batch

    def next_batch(self, state):
        batch, m = original_next(self, state)
        if int(jax.device_get(state.step)) >= 2:  # the third step gets an infinite loss weight
            batch = dict(batch, loss_mask=np.where(batch["loss_mask"] > 0, np.inf, 0).astype(np.float32))
        return batch, m

    monkeypatch.setattr(sft.SFTTask, "next_batch", next_batch)
    cfg, _ = load_config(small_config(tmp_path, steps=6, checkpoint_every=1))
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train(cfg)
    step, _ = final_params(tmp_path)
    assert step == 2


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = cli(straight, steps=16)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out

    proc = cli(killed, "--config.checkpoint_every=4", steps=16)
    ckpt_dir = killed / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [d for d in (os.listdir(ckpt_dir) if ckpt_dir.exists() else []) if d.isdigit()]
        if done:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    first = final_params(killed)[0]
    assert first < 16, "the run finished before it could be killed"

    proc = cli(killed, "--config.checkpoint_every=4", steps=16)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    (s1, p1), (s2, p2) = final_params(straight), final_params(killed)
    assert s1 == s2 == 16
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)
    steps_logged = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl")]
    assert steps_logged[-1] == 16


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    proc = cli(tmp_path, "--config.checkpoint_every=1000", steps=100000)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preempted" in out
    step, _ = final_params(tmp_path)
    assert 2 <= step < 100000


@pytest.mark.slow
def test_export_writes_the_checkpoint_params_as_an_hf_folder(tmp_path):
    from jaxpost.export import export
    from jaxpost.models import from_hf

    cfg, _ = load_config(small_config(tmp_path / "run", steps=2, eval_every=2))
    result = train(cfg)
    assert np.isfinite(result.eval_metrics["eval_loss"])  # held-out loss of the synthetic split
    last = json.loads(open(tmp_path / "run" / "metrics.jsonl").read().splitlines()[-1])
    assert last["step"] == 2 and "eval_loss" in last
    step = export(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert step == 2
    _, params = from_hf(tmp_path / "hf")
    _, saved = final_params(tmp_path / "run")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)
