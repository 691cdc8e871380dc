"""Tests for jaxpost.checkpoint: orbax round trips, retention, atomicity, preemption, and
reading a training run's checkpoint (both train-state layouts)."""

import os
import signal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpost.checkpoint import (
    Checkpointer,
    PreemptionGuard,
    abstract_target,
    latest_run_step,
    open_run,
    params_from_state,
    restore_params,
    run_metadata,
)
from jaxpost.sharding import MeshConfig, make_mesh


def _state(mesh, seed=0):
    """A nested training-state-like pytree with one array sharded over all 8 devices."""
    rng = np.random.default_rng(seed)
    w = jax.device_put(jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
                       NamedSharding(mesh, P("fsdp", None)))
    params = {"layer": {"w": w, "b": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16)},
              "emb": jnp.asarray(rng.integers(0, 100, size=(4, 3)), jnp.int32)}
    return {
        "params": params,
        "opt_state": optax.adamw(1e-3).init(params),
        "step": jnp.asarray(seed + 1, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                      np.asarray(y).reshape(-1).view(np.uint8))


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8
    return make_mesh(MeshConfig())


def test_restore_onto_target_is_bitwise_equal_and_keeps_sharding(tmp_path, mesh):
    state = _state(mesh)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(5, state, data_state={"epoch": 1, "pos": [3, 4]})
        ckpt.wait()
    with Checkpointer(tmp_path / "ckpt") as ckpt:  # fresh manager, as after a restart
        assert ckpt.latest_step() == 5
        target = abstract_target(state)
        restored, data_state = ckpt.restore(target=target)
    _assert_bitwise_equal(state, restored)
    w = restored["params"]["layer"]["w"]
    assert w.sharding.is_equivalent_to(state["params"]["layer"]["w"].sharding, w.ndim)
    assert len(w.sharding.device_set) == 8
    assert type(restored["opt_state"]) is type(state["opt_state"])  # optax named tuples
    assert data_state == {"epoch": 1, "pos": [3, 4]}


def test_restore_onto_different_sharding(tmp_path, mesh):
    state = _state(mesh)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        replicated = NamedSharding(mesh, P())
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
        restored, data_state = ckpt.restore(1, target=target)
    assert data_state is None
    assert restored["params"]["layer"]["w"].sharding == replicated
    _assert_bitwise_equal(state, restored)


def test_typed_prng_key_round_trips(tmp_path):
    key = jax.random.key(42)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"rng": key})
        restored, _ = ckpt.restore(target={"rng": key})
    assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(key))


def test_keep_last_n_and_restore_by_step(tmp_path, mesh):
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in (10, 20, 30):
            assert ckpt.save(step, _state(mesh, seed=step), data_state={"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [20, 30]
        restored, data_state = ckpt.restore(20, target=abstract_target(_state(mesh)))
        _assert_bitwise_equal(_state(mesh, seed=20), restored)
        assert data_state == {"step": 20}
        with pytest.raises(FileNotFoundError, match="available steps: \\[20, 30\\]"):
            ckpt.restore(10)
    assert sorted(os.listdir(tmp_path)) == ["20", "30"]


def test_async_save_then_wait_commits(tmp_path, mesh):
    state = _state(mesh)
    ckpt = Checkpointer(tmp_path, async_save=True)
    assert ckpt.save(3, state, metadata={"recipe": "sft_demo"})
    ckpt.wait()
    assert (tmp_path / "3").is_dir()
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
    assert ckpt.metadata() == {"recipe": "sft_demo"}
    ckpt.close()
    assert Checkpointer(tmp_path).latest_step() == 3


def test_existing_or_older_step_is_not_saved_again(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(5, {"x": jnp.ones(2)})
        assert not ckpt.save(5, {"x": jnp.zeros(2)})
        assert not ckpt.save(4, {"x": jnp.zeros(2)})
        assert ckpt.save(4, {"x": jnp.zeros(2)}, force=True)
        restored, _ = ckpt.restore(5)
    np.testing.assert_array_equal(restored["x"], np.ones(2))


def test_partial_checkpoint_is_ignored(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": jnp.arange(3)}, data_state={"pos": 1})
    # What a job killed mid-write leaves behind: a tmp step dir with some of the items.
    partial = tmp_path / "2.orbax-checkpoint-tmp-1712345678901234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        assert ckpt.all_steps() == [1]
        restored, data_state = ckpt.restore()
    np.testing.assert_array_equal(restored["x"], np.arange(3))
    assert data_state == {"pos": 1}


def test_restore_without_checkpoint_raises(tmp_path):
    with Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError, match="no complete"):
        ckpt.restore()


def test_data_state_must_be_json(tmp_path):
    with Checkpointer(tmp_path) as ckpt, pytest.raises(TypeError):
        ckpt.save(1, {"x": jnp.ones(1)}, data_state={"bad": object()})


def test_preemption_guard_sets_flag_on_sigterm_and_restores_handler():
    def previous(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with PreemptionGuard() as guard:
            assert not guard.requested and not guard.should_stop()
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.requested
            assert guard.should_stop()
            assert guard.signal_received == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_second_sigint_interrupts():
    old = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is old


def test_should_stop_is_agreed_across_processes(monkeypatch):
    from jax.experimental import multihost_utils

    gathered = []

    def fake_allgather(x):
        gathered.append(int(x))
        return np.stack([np.asarray(x), np.asarray(1, np.int32)])  # the other host was signalled

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
    guard = PreemptionGuard()
    assert not guard.requested
    assert guard.should_stop()
    assert gathered == [0]
    assert guard.requested


def test_async_save_survives_deleting_the_arrays(tmp_path, mesh):
    """The train step donates the state: a pending async save must not read those buffers."""
    state = _state(mesh)
    expected = jax.tree.map(np.asarray, state)
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, state)
        for x in jax.tree.leaves(state):
            x.delete()  # as buffer donation would
        ckpt.wait()
        restored, _ = ckpt.restore(target=abstract_target(_state(mesh)))
    _assert_bitwise_equal(expected, jax.tree.map(np.asarray, restored))


@flax.struct.dataclass
class _TrainState:
    step: jax.Array
    params: dict
    opt_state: tuple
    rng: jax.Array


def test_flax_struct_state_with_multi_transform_optimizer_round_trips(tmp_path, mesh):
    state = _state(mesh)
    labels = {"layer": {"w": "trainable", "b": "frozen"}, "emb": "frozen"}
    optimizer = optax.multi_transform(
        {"trainable": optax.adamw(1e-3), "frozen": optax.set_to_zero()}, labels)
    train_state = _TrainState(step=state["step"], params=state["params"],
                              opt_state=optimizer.init(state["params"]), rng=state["rng"])
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, train_state, data_state={"pos": 9})
        restored, data_state = ckpt.restore(target=abstract_target(train_state))
    assert isinstance(restored, _TrainState)
    _assert_bitwise_equal(train_state, restored)
    assert data_state == {"pos": 9}


# ---------------------------------------------------------------- reading a run's checkpoint
_PARAMS = {"layers": {"q": np.arange(6, dtype=np.float32).reshape(2, 3),
                      "k": np.ones((2, 3), np.float32)},
           "lm_head": {"kernel": np.full((3, 8), 2.0, np.float32)}}


def test_params_from_state_reads_the_params_layout_and_the_split_layout():
    assert params_from_state({"params": _PARAMS, "step": 3}) is _PARAMS
    split = {"trainable": {"layers": {"q": _PARAMS["layers"]["q"]}},
             "frozen": {"layers": {"k": _PARAMS["layers"]["k"]}, "lm_head": _PARAMS["lm_head"],
                        "norm": {}},  # an empty subtree holds nothing
             "step": 3, "opt_state": {}}
    merged = params_from_state(split)
    assert jax.tree.structure(merged) == jax.tree.structure(_PARAMS)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(_PARAMS)):
        assert a is b
    everything_trains = params_from_state({"trainable": _PARAMS, "frozen": {}})
    assert jax.tree.structure(everything_trains) == jax.tree.structure(_PARAMS)


def test_params_from_state_names_the_keys_when_neither_layout_is_there_or_leaves_overlap():
    with pytest.raises(ValueError, match=r"\['opt_state', 'step'\].*'params'.*'trainable'"):
        params_from_state({"step": 1, "opt_state": {}})
    with pytest.raises(ValueError, match="layers/q"):
        params_from_state({"trainable": {"layers": {"q": np.ones(1)}},
                           "frozen": {"layers": {"q": np.zeros(1)}}})


def _save_run(workdir, state, step=4, metadata=None):
    with Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        ckpt.save(step, state, metadata=metadata or {"model": {"note": "not read here"}})


def test_restore_params_of_a_split_checkpoint_equals_the_params_layout(tmp_path, mesh):
    split = {"trainable": {"layers": {"q": jnp.asarray(_PARAMS["layers"]["q"])}},
             "frozen": {"layers": {"k": jnp.asarray(_PARAMS["layers"]["k"])},
                        "lm_head": {"kernel": jnp.asarray(_PARAMS["lm_head"]["kernel"])}},
             "step": jnp.int32(4)}
    _save_run(tmp_path / "split", split)
    _save_run(tmp_path / "plain", {"params": jax.tree.map(jnp.asarray, _PARAMS),
                                   "step": jnp.int32(4)})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), _PARAMS)
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, P()), _PARAMS)
    shardings["lm_head"]["kernel"] = NamedSharding(mesh, P(None, "fsdp"))
    restored = [restore_params(tmp_path / name, abstract, shardings) for name in ("split", "plain")]
    for got in restored:
        assert jax.tree.structure(got) == jax.tree.structure(_PARAMS)
        for x, want, s in zip(jax.tree.leaves(got), jax.tree.leaves(_PARAMS),
                              jax.tree.leaves(shardings)):
            assert x.dtype == jnp.bfloat16 and x.sharding == s
            np.testing.assert_array_equal(np.asarray(x, np.float32), want)
    with open_run(tmp_path / "split") as run:
        assert run.step == 4 and run.metadata() == {"model": {"note": "not read here"}}
    with pytest.raises(ValueError, match="do not match the model"):
        restore_params(tmp_path / "split", {"layers": abstract["layers"]},
                       {"layers": shardings["layers"]})


def test_opening_a_workdir_without_checkpoints_names_it_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nowhere' has no checkpoints/ folder"):
        open_run(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    assert latest_run_step(tmp_path / "nowhere") is None
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert latest_run_step(tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint in .*empty/checkpoints"):
        run_metadata(tmp_path / "empty")
    _save_run(tmp_path / "run", {"params": {"w": jnp.ones(2)}}, step=7, metadata={"x": 1})
    assert latest_run_step(tmp_path / "run") == 7 and run_metadata(tmp_path / "run") == {"x": 1}
    with pytest.raises(FileNotFoundError, match=r"step 3 in .*run/checkpoints.*\[7\]"):
        open_run(tmp_path / "run", step=3)
    with pytest.raises(ValueError, match="checkpoints.*no 'model' entry"):
        with open_run(tmp_path / "run") as run:
            run.model_config()


# ------------------------------------------------------------ unreadable checkpoints
def _truncate_largest_tensor_file(step_dir):
    """Cuts the largest data file of a step's tensor store to 100 bytes (a torn write)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
             for f in fs if os.path.basename(d) == "d"]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(100)


def _noise(step, shape=(64, 64)):
    """Incompressible values, so that the tensor file is large enough to cut."""
    return np.random.default_rng(step).normal(size=shape).astype(np.float32)


def _three_steps(directory):
    with Checkpointer(directory, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"w": jnp.asarray(_noise(step))}, data_state={"at": step},
                      metadata={"step": step})


def test_restore_readable_skips_a_truncated_tensor_file_and_a_missing_item(tmp_path):
    import shutil

    _three_steps(tmp_path)
    _truncate_largest_tensor_file(tmp_path / "3")
    shutil.rmtree(tmp_path / "2" / "state")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2, 3]  # complete on disk, but not readable
        step, state, data_state, skipped = ckpt.restore_readable()
        assert step == 1 and data_state == {"at": 1}
        np.testing.assert_array_equal(state["w"], _noise(1))
        assert [s for s, _ in skipped] == [3, 2]
        assert "OUT_OF_RANGE" in skipped[0][1] or "size 100" in skipped[0][1], skipped[0][1]
        assert 'Item "state" was not found' in skipped[1][1], skipped[1][1]
        assert all("\n" not in why for _, why in skipped)
        # Set aside (renamed, not deleted), the steps can be written again.
        moved = ckpt.set_aside(3)
        assert os.path.basename(moved).startswith("3.unreadable-") and os.path.isdir(moved)
        assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
        ckpt.set_aside(2)
        assert ckpt.save(2, {"w": jnp.zeros((64, 64))}) and ckpt.save(3, {"w": jnp.ones(2)})
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2, 3]


@pytest.mark.slow
def test_restore_readable_names_the_directory_and_every_error_when_none_reads(tmp_path):
    from jaxpost.checkpoint import UnreadableCheckpointError

    _three_steps(tmp_path)
    for step in ("1", "2", "3"):
        _truncate_largest_tensor_file(tmp_path / step)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(UnreadableCheckpointError,
                           match=rf"no checkpoint in {tmp_path} restores: step 3: .*step 2: .*step 1: "):
            ckpt.restore_readable()
        assert ckpt.all_steps() == [1, 2, 3]  # nothing moved


def test_open_run_falls_back_to_the_newest_readable_step_but_not_past_an_explicit_one(tmp_path):
    from jaxpost.checkpoint import UnreadableCheckpointError

    _save_run(tmp_path, {"params": {"w": jnp.ones(4)}}, step=1, metadata={"step": 1})
    with Checkpointer(tmp_path / "checkpoints", async_save=False) as ckpt:
        ckpt.save(2, {"params": {"w": jnp.asarray(_noise(2))}}, data_state={},
                  metadata={"step": 2})
    _truncate_largest_tensor_file(tmp_path / "checkpoints" / "2")
    with open_run(tmp_path) as run:
        assert run.step == 2
        np.testing.assert_array_equal(run.params()["w"], np.ones(4))
        assert run.step == 1 and [s for s, _ in run.skipped] == [2]
        assert run.metadata() == {"step": 1}  # the step that was read
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # a reader moves nothing
    with pytest.raises(UnreadableCheckpointError,
                       match=rf"checkpoint {tmp_path}/checkpoints/2 is unreadable \(.*\); "
                             r"other steps: \[1\]"):
        with open_run(tmp_path, step=2) as run:
            run.params()


_CRASH_BEFORE_COMMIT = r"""
import os, sys
import jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from jaxpost.checkpoint import Checkpointer

finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def crash_on_step_2(self, *args, **kwargs):
    if os.path.basename(str(self.get())).startswith("2."):
        os._exit(17)  # every tensor of step 2 is written; the rename that commits it is not
    return await finalize(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = crash_on_step_2
ckpt = Checkpointer(sys.argv[1], async_save=sys.argv[2] == "async")
ckpt.save(1, {"w": jnp.full((256,), 1.0)}, data_state={"at": 1}, metadata={"step": 1})
ckpt.wait()
ckpt.save(2, {"w": jnp.full((256,), 2.0)}, data_state={"at": 2}, metadata={"step": 2})
ckpt.wait()
print("not reached")
"""


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_crash_between_tensor_write_and_commit_leaves_the_previous_step_usable(tmp_path, mode):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CRASH_BEFORE_COMMIT, str(tmp_path), mode],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 17, proc.stdout + proc.stderr
    (tmp,) = [p for p in os.listdir(tmp_path) if p.startswith("2.")]
    written = [f for _, _, fs in os.walk(tmp_path / tmp / "state") for f in fs]
    assert written, "the crash should come after the tensors were written"
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
        state, data_state = ckpt.restore()
        assert data_state == {"at": 1}
        np.testing.assert_array_equal(state["w"], np.full((256,), 1.0))
        assert ckpt.metadata() == {"step": 1}
        # The leftover does not block writing step 2 again.
        assert ckpt.save(2, {"w": jnp.full((256,), 2.0)}, data_state={"at": 2})
        ckpt.wait()
        restored, _ = ckpt.restore(2)
    np.testing.assert_array_equal(restored["w"], np.full((256,), 2.0))


# ----------------------------------------------------------- interruptible host waits
def test_a_signal_inside_interruptible_raises_preempted_and_outside_only_sets_the_flag():
    import time

    from jaxpost.checkpoint import Preempted

    old = signal.getsignal(signal.SIGTERM)
    try:
        with PreemptionGuard() as guard:
            with guard.interruptible():
                pass  # no signal: nothing happens
            start = time.monotonic()
            with pytest.raises(Preempted) as raised:
                with guard.interruptible():
                    os.kill(os.getpid(), signal.SIGTERM)
                    while time.monotonic() - start < 10:  # a host wait that never ends
                        pass
            assert raised.value.signum == signal.SIGTERM and time.monotonic() - start < 5
            assert guard.requested and guard.should_stop()
            with pytest.raises(Preempted):  # a stop is pending: the next wait is not started
                with guard.interruptible():
                    raise AssertionError("not reached")
        guard = PreemptionGuard()
        with guard:
            os.kill(os.getpid(), signal.SIGTERM)  # outside: the flag only
            assert guard.requested
    finally:
        signal.signal(signal.SIGTERM, old)
    assert signal.getsignal(signal.SIGTERM) is old


def test_a_second_sigterm_terminates_the_process():
    import subprocess
    import sys

    script = ("import os, signal, time\n"
              "from jaxpost.checkpoint import PreemptionGuard\n"
              "with PreemptionGuard() as guard:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    assert guard.requested\n"
              "    print('first', flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(5)\n"
              "    print('survived', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout.split() == ["first"], proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGTERM
