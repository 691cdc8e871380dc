"""Orbax checkpoints of the training state plus the data-iterator state, and preemption.

A checkpoint is one step directory `DIR/<step>/` with three items:

- `state`: an arbitrary pytree of (possibly sharded) `jax.Array`s, numpy arrays and
  Python scalars (params, optimizer state, step, rng), written by orbax' `StandardSave`
  (OCDBT + tensorstore). Typed PRNG keys (`jax.random.key`) are stored by orbax
  natively (as their uint32 key data plus the implementation name) and come back as
  typed keys; raw `jax.random.key_data` arrays work as well.
- `data_state`: a JSON-serialisable dict, one file per process
  (`process_<i>-of-<n>.json`), since each host has its own data-iterator position.
- `metadata`: a JSON dict written once (by the primary host), e.g. the config.

Atomicity: orbax writes a step to `<step>.orbax-checkpoint-tmp-<timestamp>/` and renames
it to `<step>/` only after every item is complete (on GCS, where renames are not atomic,
it marks completion with a `commit_success.txt` file instead). A job killed mid-write
therefore leaves a tmp directory that `latest_step()` and `restore()` ignore. Such
leftovers are not deleted automatically (an export running next to a live training job
must never delete the job's in-flight save); remove them by hand if disk space matters.

A training workdir keeps its checkpoints in `WORKDIR/checkpoints/`. Reading another
run's checkpoint (export, `model.init_from`, a reward model used as a reward function)
goes through `open_run`, `run_metadata` and `restore_params`, which never create folders
and name the directory in their errors; `params_from_state` takes the full params out of
a saved train state of either layout (`params`, or `trainable` + `frozen`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

if TYPE_CHECKING:
    from jaxpost.models.config import ModelConfig

_STATE = "state"
_DATA_STATE = "data_state"
_METADATA = "metadata"


# --------------------------------------------------------------------------------------
# Per-process JSON item (the data-iterator state)
# --------------------------------------------------------------------------------------


def _process_file(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _PerProcessJsonHandler(ocp.CheckpointHandler):
    """Orbax handler that writes one JSON file per process (like grain's iterator handler)."""

    def save(self, directory: epath.Path, args: "PerProcessJsonSave") -> None:
        _process_file(epath.Path(directory)).write_text(json.dumps(args.item, sort_keys=True))

    def restore(self, directory: epath.Path, args: "PerProcessJsonRestore | None" = None) -> Any:
        path = _process_file(epath.Path(directory))
        if not path.exists():
            found = sorted(p.name for p in epath.Path(directory).glob("process_*.json"))
            raise FileNotFoundError(
                f"no data-iterator state for this process at {path}; the checkpoint holds "
                f"{found} (was it written with a different number of processes?)")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> None:
        del directory
        return None

    def finalize(self, directory: epath.Path) -> None:
        del directory

    def close(self) -> None:
        pass

    @classmethod
    def typestr(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class PerProcessJsonSave(ocp.args.CheckpointArgs):
    """Orbax save args: `item` (JSON-serialisable) is written once per process."""

    item: Any


@ocp.args.register_with_handler(_PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class PerProcessJsonRestore(ocp.args.CheckpointArgs):
    """Orbax restore args for `PerProcessJsonSave`: reads this process' file."""


# --------------------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------------------


def abstract_target(tree: Any) -> Any:
    """A restore target from a pytree of arrays: `jax.ShapeDtypeStruct`s with their shardings.

    Leaves that are already `ShapeDtypeStruct`s are kept; other leaves (numpy arrays,
    Python scalars) are left as they are, and orbax restores them as such.
    """
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x
    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Saves and restores `(state, data_state)` per step, keeping the last `keep` steps.

    Usage::

        with Checkpointer(workdir + "/checkpoints") as ckpt:
            if ckpt.latest_step() is not None:
                state, data_state = ckpt.restore(target=abstract_target(state))
            ...
            ckpt.save(step, state, data_state=it.get_state())

    All processes must call `save` and `restore` (they are collective under multi-host).
    """

    def __init__(self, directory: str | epath.PathLike, *, keep: int | None = 3,
                 async_save: bool = True):
        """Opens (creating if needed) a checkpoint directory.

        Args:
            directory: Where the step directories live (local path or `gs://...`).
            keep: How many of the most recent checkpoints to keep; None keeps all.
            async_save: Write in a background thread after copying arrays to host
                memory, so training continues during the write; `wait()` blocks until
                the last save is on disk.
        """
        if keep is not None and keep < 1:
            raise ValueError(f"Checkpointer(keep={keep}): keep at least 1 checkpoint, or None")
        self._directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,  # the caller decides when to save
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=False,
        )
        self._manager = ocp.CheckpointManager(
            self._directory, options=options, item_names=(_STATE, _DATA_STATE, _METADATA))

    @property
    def directory(self) -> epath.Path:
        """The checkpoint root directory."""
        return self._directory

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, *, data_state: dict | None = None,
             metadata: dict | None = None, force: bool = False) -> bool:
        """Saves a checkpoint for `step` (asynchronously if so configured).

        Args:
            step: The training step the state belongs to (the directory name).
            state: A pytree of arrays / scalars, e.g. params, optimizer state, step, rng.
            data_state: JSON-serialisable state of this process' data iterator.
            metadata: JSON-serialisable dict stored alongside (e.g. the config).
            force: Also save when `step` is not newer than the latest checkpoint (e.g.
                after restoring an older one); an existing step is never overwritten.

        Returns:
            Whether a checkpoint was written (False if `step` already exists or is older
            than the latest checkpoint without `force`).
        """
        step = int(step)
        if step in self._manager.all_steps():
            logging.info("Checkpoint for step %d exists in %s; not saving again",
                         step, self._directory)
            return False
        latest = self._manager.latest_step()
        if not force and latest is not None and step < latest:
            logging.warning(
                "Not saving step %d: older than the latest checkpoint %d in %s (force=True "
                "saves it anyway)", step, latest, self._directory)
            return False
        json.dumps(data_state)  # fail here, not in a background thread
        json.dumps(metadata or {})
        args = ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(state),
            _DATA_STATE: PerProcessJsonSave(data_state),
            _METADATA: ocp.args.JsonSave(metadata or {}),
        })
        return bool(self._manager.save(step, args=args, force=True))

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self._directory}")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self._directory}; "
                f"available steps: {steps}")
        return int(step)

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict | None]:
        """Restores `(state, data_state)` of `step` (default: the latest).

        Args:
            step: The step to restore; None for the latest complete checkpoint.
            target: Optional pytree like the saved state whose leaves are
                `jax.ShapeDtypeStruct`s with `.sharding` (or `jax.Array`s, whose shape,
                dtype and sharding are used): arrays are read straight onto those
                shardings, which may differ from the ones they were saved with, and the
                result has the target's tree structure (e.g. optax named tuples). Without
                it, arrays come back with their saved shardings (same devices needed) and
                containers as dicts/lists.

        Returns:
            The state pytree and this process' data-iterator state (None if none saved).

        Raises:
            FileNotFoundError: if there is no such complete checkpoint.
        """
        step = self._resolve_step(step)
        target = None if target is None else abstract_target(target)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(target),
            _DATA_STATE: PerProcessJsonRestore(),
        }))
        return restored[_STATE], restored[_DATA_STATE]

    def metadata(self, step: int | None = None) -> dict:
        """The `metadata` dict saved with `step` (default: the latest)."""
        step = self._resolve_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))
        return restored[_METADATA]

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --------------------------------------------------------------------------------------
# A training run's checkpoints, read by others (export, init_from, reward models)
# --------------------------------------------------------------------------------------

CHECKPOINTS = "checkpoints"  # the checkpoint folder inside a training workdir


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    """`WORKDIR/checkpoints`, where a training run keeps its checkpoints."""
    return epath.Path(workdir) / CHECKPOINTS


def _merge_params(frozen: Any, trainable: Any, path: str = "") -> Any:
    """Deep merge of two nested dicts with disjoint leaves (None counts as absent)."""
    if frozen is None:
        return trainable
    if trainable is None:
        return frozen
    if not (isinstance(frozen, Mapping) and isinstance(trainable, Mapping)):
        raise ValueError(f"the checkpoint's 'frozen' and 'trainable' params both hold "
                         f"{path or 'the root'!r}; their leaves must be disjoint")
    out = {}
    for key in list(frozen) + [k for k in trainable if k not in frozen]:
        sub = f"{path}/{key}" if path else str(key)
        value = _merge_params(frozen.get(key), trainable.get(key), sub)
        if value is not None and not (isinstance(value, Mapping) and not value):
            out[key] = value  # empty subtrees (a partition's placeholders) are dropped
    return out


def params_from_state(state: Mapping[str, Any]) -> dict:
    """The full model params of a saved train state, for either layout.

    Args:
        state: a restored train-state dict: either with a `params` entry, or with
            `trainable` and `frozen` entries (nested dicts with disjoint leaves, as a
            run that freezes part of the model saves them; a missing or None side, or
            an empty subtree, counts as holding nothing).

    Returns:
        `state["params"]`, or the deep merge of `frozen` and `trainable`.

    Raises:
        ValueError: neither layout's keys are present, or a leaf is in both trees.
    """
    if "params" in state:
        return state["params"]
    if "trainable" in state or "frozen" in state:
        return _merge_params(state.get("frozen") or {}, state.get("trainable") or {})
    raise ValueError(f"the checkpoint state has keys {sorted(state)}; expected 'params', or "
                     "'trainable' and 'frozen' (the split layout)")


class RunCheckpoint:
    """One complete checkpoint of a training workdir, opened for reading (`open_run`)."""

    def __init__(self, workdir: str | os.PathLike, step: int | None = None):
        self.workdir = os.fspath(workdir)
        self.directory = checkpoint_dir(workdir)
        if not self.directory.exists():  # Checkpointer would create it
            raise FileNotFoundError(f"workdir {self.workdir!r} has no {CHECKPOINTS}/ folder "
                                    f"({self.directory}); is it a jaxpost training workdir?")
        self._ckpt = Checkpointer(self.directory, async_save=False)
        try:
            self.step = self._ckpt._resolve_step(step)  # names the directory and the steps
        except BaseException:
            self._ckpt.close()
            raise

    def metadata(self) -> dict:
        """The metadata dict the run stored with this step (config, model config, ...)."""
        return self._ckpt.metadata(self.step)

    def model_config(self) -> ModelConfig:
        """The `ModelConfig` the run stored in its metadata."""
        return model_config_from_metadata(self.metadata(), where=str(self.directory))

    def state(self) -> Any:
        """The saved train state as nested dicts (arrays on their saved shardings)."""
        state, _ = self._ckpt.restore(self.step)
        return state

    def params(self) -> dict:
        """The full model params of this step (`params_from_state`)."""
        try:
            return params_from_state(self.state())
        except ValueError as e:
            raise ValueError(f"{self.directory} (step {self.step}): {e}") from None

    def restore_params(self, abstract_params: Any, shardings: Any) -> Any:
        """`params()` checked against the structure of `abstract_params`, cast to its
        dtypes and placed onto `shardings`. A LoRA run's adapters are merged into their
        kernels (with the run's own scale) when `abstract_params` has none: the trained
        model as plain params (to start another run from, or to score with)."""
        from jaxpost.peft import lora

        params = self.params()
        if lora.has_adapters(params) and not lora.has_adapters(abstract_params):
            params = lora.merge_adapters(params, self.model_config().lora_scale)
        expected = jax.tree.structure(abstract_params)
        if jax.tree.structure(params) != expected:
            raise ValueError(f"the params in {self.directory} (step {self.step}) do not match "
                             f"the model: {jax.tree.structure(params)} vs {expected}")
        return jax.tree.map(lambda x, a, s: jax.device_put(x.astype(a.dtype), s),
                            params, abstract_params, shardings)

    def close(self) -> None:
        self._ckpt.close()

    def __enter__(self) -> "RunCheckpoint":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_run(workdir: str | os.PathLike, step: int | None = None) -> RunCheckpoint:
    """Opens checkpoint `step` (default: the latest complete one) of a training workdir.

    Use as a context manager: `with open_run(workdir) as run: run.metadata(), run.params()`.

    Raises:
        FileNotFoundError: the workdir has no `checkpoints/` folder (nothing is created),
            no complete checkpoint, or none for `step` (naming the directory and the
            steps it has).
    """
    return RunCheckpoint(workdir, step)


def latest_run_step(workdir: str | os.PathLike) -> int | None:
    """The latest complete checkpoint step of a workdir; None when it has none (or no
    `checkpoints/` folder, which is not created)."""
    if not checkpoint_dir(workdir).exists():
        return None
    with Checkpointer(checkpoint_dir(workdir), async_save=False) as ckpt:
        return ckpt.latest_step()


def run_metadata(workdir: str | os.PathLike, step: int | None = None) -> dict:
    """The metadata a training run stored with checkpoint `step` (default: the latest)."""
    with open_run(workdir, step) as run:
        return run.metadata()


def model_config_from_metadata(metadata: Mapping[str, Any], where: str = "") -> ModelConfig:
    """The `ModelConfig` a training run stored in its checkpoint metadata (`where`: the
    checkpoint directory, for the error)."""
    from jaxpost.models.config import ModelConfig

    if "model" not in metadata:
        of = f" of {where}" if where else ""
        raise ValueError(f"checkpoint metadata{of} has no 'model' entry; was it written by "
                         "`python -m jaxpost.train`?")
    return ModelConfig.from_dict(metadata["model"])


def restore_params(workdir: str | os.PathLike, abstract_params: Any, shardings: Any,
                   step: int | None = None) -> Any:
    """The full params of a run's checkpoint `step` (default: the latest), cast to the
    dtypes of `abstract_params` and placed onto `shardings` (`RunCheckpoint.restore_params`).

    Raises:
        FileNotFoundError: as `open_run`.
        ValueError: the saved params do not have the structure of `abstract_params`.
    """
    with open_run(workdir, step) as run:
        return run.restore_params(abstract_params, shardings)


# --------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------


class PreemptionGuard:
    """Turns SIGTERM (and SIGINT) into a flag the training loop polls.

    Inside the `with` block the signal handlers only set `requested`; the loop checks
    `should_stop()` (e.g. every step), saves a checkpoint and exits with status 0. The
    previous handlers are restored on exit. A second SIGINT while a stop is pending runs
    the previous SIGINT handler (by default: KeyboardInterrupt), so Ctrl-C twice still
    interrupts a stuck job.

    Usage::

        with PreemptionGuard() as guard:
            for step in ...:
                state, metrics = train_step(state, batch)
                if guard.should_stop():
                    ckpt.save(step, state, data_state=..., force=True)
                    ckpt.wait()
                    break
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        """Args:
            signals: The signals to catch (SIGTERM is what TPU VMs / Kubernetes /
                SLURM send before preemption).
        """
        self._signals = tuple(signals)
        self._requested = False
        self.signal_received: int | None = None  # the first signal caught, if any
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was requested on this process (by a signal or `request()`)."""
        return self._requested

    def request(self) -> None:
        """Requests a stop as if a signal had arrived (e.g. from a wall-clock budget)."""
        self._requested = True

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self._requested:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
                return
            raise KeyboardInterrupt
        if self.signal_received is None:
            self.signal_received = signum
        self._requested = True

    def should_stop(self) -> bool:
        """Whether to stop now, agreed by all processes.

        With one process this is the local flag. With several it is a collective (an
        all-gather of the flags): every process must call it at the same points of the
        loop, and all get True as soon as any one of them was signalled.
        """
        if jax.process_count() == 1:
            return self._requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self._requested, np.int32))
        if bool(np.any(flags)):
            self._requested = True
        return self._requested

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            logging.warning("PreemptionGuard entered outside the main thread: signal "
                            "handlers cannot be installed; only request() sets the flag")
            return self
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
