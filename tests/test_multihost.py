"""Multi-host training with real processes: two localhost `jax.distributed` processes of
4 fake CPU devices each against one process of 8 (gloo CPU collectives)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from jaxpost import sharding as sh
from jaxpost.distributed import DistributedConfig, initialize
from tests.cli_testing import ROOT, xla_flags

WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(devices))
    return env


def _distributed_flags(port: int, pid: int, num: int = 2) -> list[str]:
    return [f"--config.distributed.coordinator_address=localhost:{port}",
            f"--config.distributed.num_processes={num}", f"--config.distributed.process_id={pid}",
            "--config.distributed.initialization_timeout_s=120"]


def _losses(path: str) -> dict[int, dict]:
    with open(path) as f:
        return {r["step"]: r for r in map(json.loads, f)}


# ----------------------------------------------------------------------- one process
def test_distributed_config_names_incomplete_settings():
    assert not DistributedConfig().active
    assert DistributedConfig(enabled=True).active  # TPU VM: JAX finds the rest
    with pytest.raises(ValueError, match="set coordinator_address, num_processes and process_id"):
        DistributedConfig(coordinator_address="10.0.0.2:8476")
    with pytest.raises(ValueError, match="process_id=2 must be in"):
        DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="cpu_collectives"):
        DistributedConfig(cpu_collectives="nccl")
    assert initialize(DistributedConfig()) is False  # one process: nothing to join


def test_one_process_local_rows_and_gathers_are_the_batch():
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=4))
    rows = np.arange(24, dtype=np.float32).reshape(8, 3)
    batch = sh.shard_batch(rows, mesh)
    chex.assert_trees_all_equal(sh.local_rows({"x": batch}), {"x": rows})
    chex.assert_trees_all_equal(sh.global_value(batch), rows)
    chex.assert_trees_all_equal(sh.gather_processes({"r": rows[:2]}), {"r": rows[:2]})


# ------------------------------------------------------------------- two processes
def _recipes(tmp_path) -> str:
    """A tiny SFT warm-up and a GRPO recipe on it: batch-scaled advantages, a KL
    reference, two iterations per rollout (old log-probs), and a sampled evaluation."""
    sft = tmp_path / "sft_tiny.py"
    sft.write_text(
        "from jaxpost.config import to_config_dict\n"
        "from jaxpost.train.sft import SFTConfig\n\n"
        "def get_config():\n"
        "    c = to_config_dict(SFTConfig())\n"
        "    c.steps, c.log_every, c.checkpoint_every = 3, 1, 0\n"
        "    c.model.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,\n"
        "                   num_kv_heads=1, head_dim=16)\n"
        "    c.data.update(seq_len=32, batch_size=8, num_records=200, pack=False)\n"
        "    c.optimizer.lr = 3e-3\n"
        "    return c\n")
    grpo = tmp_path / "grpo_tiny.py"
    grpo.write_text(
        "from jaxpost.config import to_config_dict\n"
        "from jaxpost.train.grpo import GRPOConfig\n\n"
        "def get_config():\n"
        "    c = to_config_dict(GRPOConfig())\n"
        f"    c.init_sft_config = {str(sft)!r}\n"
        "    c.steps, c.log_every, c.checkpoint_every, c.eval_every = 2, 1, 0, 2\n"
        "    c.model.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,\n"
        "                   num_kv_heads=1, head_dim=16)\n"
        "    c.prompts.num_records = 200\n"
        "    c.grpo.update(num_generations=4, prompts_per_step=4, max_prompt_length=24,\n"
        "                  max_completion_length=6, beta=0.04, scale_rewards='batch',\n"
        "                  num_iterations=2, loss_type='grpo')\n"
        "    c.reward_fns = ('jaxpost.rl.rewards:exact_answer',\n"
        "                    'tests.multihost_worker:distinct_characters')\n"
        "    c.optimizer.lr = 1e-3\n"
        "    c.eval.update(task='synthetic:addition:2', num_prompts=8, batch_size=8,\n"
        "                  temperature=1.0, max_new_tokens=6)\n"
        "    return c\n")
    return str(grpo)


def _train(recipe: str, workdir: str, devices: int, flags=(), **popen):
    cmd = [sys.executable, "-m", "jaxpost.train", f"--config={recipe}",
           f"--config.workdir={workdir}", *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _finish(proc, timeout=900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_two_processes_train_sft_and_grpo_like_one_process_of_eight_devices(tmp_path):
    recipe = _recipes(tmp_path)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    port = _free_port()
    procs = [_train(recipe, two, 4, _distributed_flags(port, pid)) for pid in range(2)]
    single = _train(recipe, one, 8)
    outs = [_finish(p) for p in procs]
    _finish(single)
    assert "eval_accuracy" in outs[0] and "eval_accuracy" not in outs[1]  # process 0 prints

    for sub, keys in (("sft_init", ("loss", "grad_norm")),
                      ("", ("loss", "grad_norm", "reward_mean", "reward_std", "kl", "ratio_mean",
                           "completion_length_mean", "eval_accuracy"))):
        ref, got = (_losses(os.path.join(w, sub, "metrics.jsonl")) for w in (one, two))
        assert sorted(got) == sorted(ref) == ([1, 2, 3] if sub else [1, 2])
        for step in ref:
            for k in keys:
                if k in ref[step]:
                    np.testing.assert_allclose(got[step][k], ref[step][k], rtol=2e-5,
                                               atol=1e-6, err_msg=f"{sub} step {step} {k}")
        assert all(r["grad_norm"] > 1e-4 for r in ref.values())  # a comparison of something
    # Only process 0 writes metrics.jsonl (one record per step, not one per process).
    with open(os.path.join(two, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 2

    # The checkpoints the two processes wrote restore in this one process (8 devices).
    from jaxpost.checkpoint import open_run

    for sub in ("sft_init", ""):
        restored = []
        for w in (one, two):
            with open_run(os.path.join(w, sub)) as run:
                restored.append(jax.device_get(run.params()))
                assert run.step == (2 if sub == "" else 3)
        chex.assert_trees_all_close(restored[1], restored[0], rtol=1e-4, atol=1e-6)
        chex.assert_tree_all_finite(restored[1])


@pytest.mark.slow
def test_two_process_primitives_and_a_killed_peer_stops_the_run(tmp_path):
    heartbeat = 5
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, WORKER, str(pid), "2", str(port), str(tmp_path), str(heartbeat)],
        cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pid in range(2)]
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline, "the two-process SFT run never logged a step"
            assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:]
                                                          for p in procs]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        out, _ = procs[0].communicate(timeout=heartbeat + 60)
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    print(f"process 0 exited {waited:.1f} s after process 1 was killed")
    assert procs[0].returncode != 0, out[-2000:]
    assert waited < heartbeat + 60
    # How the survivor learns of it depends on where the peer died: the coordination
    # service's heartbeat, or a collective already in flight whose gloo TCP pair saw the
    # connection drop ("Connection reset") or a torn message ("gloo::EnforceNotMet").
    assert any(w in out for w in ("heartbeat", "Connection", "unhealthy", "UNAVAILABLE",
                                  "gloo::")), out[-2000:]

    reports = [json.loads((tmp_path / f"report_{p}.json").read_text()) for p in range(2)]
    rows = [(np.arange(12).reshape(4, 3) + 100 * p).tolist() for p in range(2)]
    for pid, r in enumerate(reports):
        assert (r["process_count"], r["device_count"], r["global_shape"]) == (2, 8, [8, 3])
        assert r["global"] == rows[0] + rows[1]  # process p's rows at [4p, 4p + 4)
        assert r["local_rows"] == rows[pid]
        assert r["shard_rows"] == list(range(4 * pid, 4 * pid + 4))
        assert r["gathered"] == [0, 10, 1, 11]
        assert r["should_stop"] is True  # process 1 was signalled; both stop
    # to_hf gathered the sharded tensors of both processes: the same files as one process.
    from safetensors.numpy import load_file

    from jaxpost.models import init_params, tiny, to_hf

    cfg = tiny("llama")
    to_hf(cfg, init_params(cfg, jax.random.key(0)), tmp_path / "hf_one")
    chex.assert_trees_all_equal(load_file(tmp_path / "hf" / "model.safetensors"),
                                load_file(tmp_path / "hf_one" / "model.safetensors"))
