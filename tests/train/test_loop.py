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
    cfg.trainer = "dpo"  # not a trainer (yet)
    with pytest.raises(ConfigError, match="valid trainers"):
        load_config(cfg)


def test_cli_reports_a_bad_key_and_exits_nonzero(tmp_path):
    proc = cli(tmp_path, "--config.optimizer.warmup=3")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "warmup" in out


@pytest.mark.slow  # heavy: the not-slow suite has a 5-minute budget
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


# ------------------------------------------------------------- reliability (issue 8)
def test_an_update_that_makes_params_nonfinite_is_not_applied_and_is_flagged():
    """AdamW with eps=0: a parameter whose gradient is 0 gets 0/0 = NaN, although the loss
    and the gradient are finite."""
    import chex
    import jax.numpy as jnp
    import optax

    from jaxpost.train.state import TrainState
    from jaxpost.train.step import train_step

    def loss_fn(params, batch, rng):  # w[1] does not enter the loss: its gradient is 0
        return jnp.sum((params["w"][0] - batch["x"]) ** 2), jnp.asarray(1.0), {}

    opt = optax.adam(1e-2, eps=0.0)
    state = TrainState.create({"w": jnp.ones(2)}, opt, seed=0)
    step = jax.jit(lambda s, b: train_step(s, b, loss_fn=loss_fn, optimizer=opt))
    new, metrics = step(state, {"x": jnp.zeros(())})
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["nonfinite"]) == 1 and int(metrics["nonfinite_params"]) == 1
    chex.assert_trees_all_equal(jax.device_get(new.trainable), jax.device_get(state.trainable))
    chex.assert_trees_all_equal(jax.device_get(new.opt_state), jax.device_get(state.opt_state))
    assert int(new.step) == 0
    healthy = optax.adam(1e-2)
    state = TrainState.create({"w": jnp.ones(2)}, healthy, seed=0)
    new, metrics = jax.jit(lambda s, b: train_step(s, b, loss_fn=loss_fn, optimizer=healthy))(
        state, {"x": jnp.zeros(())})
    assert int(metrics["nonfinite"]) == 0 and int(metrics["nonfinite_params"]) == 0
    assert int(new.step) == 1


@pytest.mark.parametrize("key,value", [
    ("lr", float("nan")), ("lr", -1e-3), ("eps", 0.0), ("eps", float("nan")), ("b2", 1.0),
    ("weight_decay", -0.1), ("clip_grad_norm", float("inf")), ("momentum", 1.0)])
def test_optimizer_values_that_cannot_train_are_config_errors_naming_the_key(tmp_path, key,
                                                                            value):
    cfg = small_config(tmp_path)
    cfg.optimizer[key] = value
    with pytest.raises(ConfigError, match=rf"optimizer\.{key}="):
        load_config(cfg)


@pytest.mark.slow  # heavy: the not-slow suite has a 5-minute budget
def test_an_evaluation_error_never_loses_the_step_it_follows(tmp_path, monkeypatch):
    import jaxpost.train.sft as sft

    def broken_evaluate(self, params, step):
        raise RuntimeError(f"eval exploded at step {step}")

    monkeypatch.setattr(sft.SFTTask, "evaluate", broken_evaluate)
    cfg, _ = load_config(small_config(tmp_path, steps=4, eval_every=2, checkpoint_every=100))
    with pytest.raises(RuntimeError, match="eval exploded at step 2"):
        train(cfg)
    step, _ = final_params(tmp_path)
    assert step == 2  # saved although checkpoint_every=100
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and np.isfinite(records[-1]["loss"])


@pytest.mark.slow
def test_sigterm_interrupts_a_host_wait_and_the_resumed_run_equals_a_straight_one(
        tmp_path, monkeypatch):
    """A batch that never comes (a stuck data source, reward function or rollout):
    SIGTERM cuts the wait, step 2 is saved with the data position before the lost batch,
    and resuming replays that batch, so the run ends bitwise where a straight run does."""
    import threading

    import jaxpost.train.sft as sft

    straight, _ = load_config(small_config(tmp_path / "straight", steps=4, checkpoint_every=100))
    expected = jax.device_get(train(straight).state.params)

    original_next = sft.SFTTask.next_batch
    hung, waited_out = threading.Event(), threading.Event()

    def next_batch(self, state):
        if int(jax.device_get(state.step)) == 2 and not hung.is_set():
            original_next(self, state)  # half of the work: the iterator moved on
            hung.set()
            start = time.monotonic()
            while time.monotonic() - start < 60:  # a host-side wait that does not end
                pass
            waited_out.set()  # only reached if SIGTERM did not cut the wait
            raise AssertionError("SIGTERM did not interrupt the host-side wait")
        return original_next(self, state)

    monkeypatch.setattr(sft.SFTTask, "next_batch", next_batch)
    threading.Thread(target=lambda: hung.wait(120) and os.kill(os.getpid(), signal.SIGTERM),
                     daemon=True).start()
    cfg, _ = load_config(small_config(tmp_path / "run", steps=4, checkpoint_every=100))
    result = train(cfg)
    assert hung.is_set() and not waited_out.is_set() and result.preempted
    assert final_params(tmp_path / "run")[0] == 2
    resumed = train(cfg)  # hung is set: the batches come now
    assert not resumed.preempted and int(resumed.state.step) == 4
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(resumed.state.params))):
        np.testing.assert_array_equal(a, b)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_falls_back_over_an_unreadable_latest_checkpoint_and_sets_it_aside(tmp_path,
                                                                                 caplog):
    import shutil

    cfg, _ = load_config(small_config(tmp_path, steps=3, checkpoint_every=1))
    train(cfg)
    shutil.rmtree(tmp_path / "checkpoints" / "3" / "state")  # a step folder without state
    with caplog.at_level("WARNING"):
        result = train(cfg)
    assert int(result.state.step) == 3
    assert f"{tmp_path}/checkpoints/3 is unreadable" in caplog.text
    assert "resuming from step 2 instead" in caplog.text
    names = os.listdir(tmp_path / "checkpoints")
    assert sorted(n for n in names if n.isdigit()) == ["1", "2", "3"]
    assert len([n for n in names if n.startswith("3.unreadable-")]) == 1
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
