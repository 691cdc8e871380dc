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

Unreadable checkpoints: a step directory that is complete on disk but does not restore
(a truncated tensor file, a missing item) is skipped by `Checkpointer.restore_readable`,
which falls back to the newest step that restores, naming the bad one. The training
loop then moves the bad step aside (`set_aside`: renamed to `<step>.unreadable-<time>`,
never deleted) so that it can save that step again; readers (`open_run`) never move
anything.

A training workdir keeps its checkpoints in `WORKDIR/checkpoints/`. Reading another
run's checkpoint (export, `model.init_from`, a reward model used as a reward function)
goes through `open_run`, `run_metadata` and `restore_params`, which never create folders
and name the directory in their errors; `params_from_state` takes the full params out of
a saved train state of either layout (`params`, or `trainable` + `frozen`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
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


class UnreadableCheckpointError(ValueError):
    """A complete checkpoint step does not restore (the message names its directory)."""


def error_summary(error: BaseException, limit: int = 400) -> str:
    """One line for an error from orbax/tensorstore: the innermost cause's first line
    (a tensorstore failure is wrapped in several less specific exceptions)."""
    inner = error
    seen = set()
    while inner.__cause__ is not None and id(inner) not in seen:
        seen.add(id(inner))
        inner = inner.__cause__
    text = str(inner).strip() or type(inner).__name__
    if isinstance(inner, KeyError) and len(text) > 1 and text[0] == text[-1] in "'\"":
        text = text[1:-1]  # str(KeyError) quotes its message
    line = " ".join(text.splitlines()[0].split()) if text else type(inner).__name__
    line = f"{type(inner).__name__}: {line}"
    return line if len(line) <= limit else line[:limit - 3] + "..."


_ABANDONED: set[str] = set()  # step directories whose restore failed in this process


def _exception_text(error: BaseException | None) -> str:
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


class _AbandonedReadsFilter(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" records about reads of a step
    directory whose restore failed (they repeat the failure, at exit, at length)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "never retrieved" not in message:
            return True
        text = message + _exception_text(record.exc_info[1] if record.exc_info else None)
        return not any(d in text for d in _ABANDONED)


def _ignore_abandoned_orbax_reads(step_dir: Any) -> None:
    """Silences the leftovers of a failed restore of `step_dir`: orbax abandons the step's
    other reads, and each reports the failure again when it is garbage-collected (an
    "Exception ignored in <coroutine ...>" traceback, or an asyncio "exception was never
    retrieved" record), possibly at exit; and tensorstore's threads, finishing those reads
    after orbax closed its event loop, fail to wake it ("Exception ignored in: None ...
    RuntimeError: Event loop is closed", raised outside any Python thread). Other errors
    still print."""
    _ABANDONED.add(os.fspath(step_dir))
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            message="coroutine '_read_array_index_and_device_put' was never")
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReadsFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedReadsFilter())
    previous = sys.unraisablehook
    if getattr(previous, "jaxpost_filter", False):
        return

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        if (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"
                # raised on a thread that threading did not start (a "dummy" thread)
                and isinstance(threading.current_thread(), threading._DummyThread)):
            return
        previous(unraisable)

    hook.jaxpost_filter = True
    sys.unraisablehook = hook


@contextmanager
def _stderr_held():
    """Holds what is written to file descriptor 2 (Python, absl and C++ alike) and writes
    it out at the end, unless the yielded `discard()` was called."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold
        yield lambda: None
        return
    held = tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    keep = [True]
    try:
        yield lambda: keep.__setitem__(0, False)
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if keep[0]:
            held.seek(0)
            data = held.read()
            if data:
                os.write(2, data)
        held.close()


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

    def restore(self, step: int | None = None, target: Any = None, *,
                data_state: bool = True, host: bool = False) -> tuple[Any, dict | None]:
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
            data_state: False: skip the data-iterator state (returned as None). The
                state alone restores in any number of processes (readers, exports); the
                data position exists per process of the run that wrote it.
            host: without `target`: read every array into host memory (numpy), on no
                device, so that a checkpoint of N processes (or other devices) reads
                in one.

        Returns:
            The state pytree and this process' data-iterator state (None if none saved).

        Raises:
            FileNotFoundError: if there is no such complete checkpoint.
        """
        step = self._resolve_step(step)
        target = None if target is None else abstract_target(target)
        if target is None and host:
            saved = ocp.StandardCheckpointHandler().metadata(self._directory / str(step) / _STATE)
            target = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), saved.tree)
        items = {_STATE: ocp.args.StandardRestore(target)}
        if data_state:
            items[_DATA_STATE] = PerProcessJsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[_STATE], restored[_DATA_STATE] if data_state else None

    def restore_readable(self, target: Any = None, steps: Sequence[int] | None = None, *,
                         data_state: bool = True, host: bool = False,
                         ) -> tuple[int, Any, dict | None, list[tuple[int, str]]]:
        """Restores the newest checkpoint that reads, trying `steps` newest first.

        Args:
            target: as in `restore`.
            steps: the steps to try (default: every complete checkpoint).
            data_state, host: as in `restore`.

        Returns:
            `(step, state, data_state, skipped)`, `skipped` listing `(step, error)` of
            each newer step that failed to restore (a warning names each one).

        Raises:
            FileNotFoundError: there is no complete checkpoint.
            UnreadableCheckpointError: none of them restores (naming each step's error).
        """
        steps = sorted(self.all_steps() if steps is None else steps, reverse=True)
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self._directory}")
        skipped: list[tuple[int, str]] = []
        for step in steps:
            error = None
            with _stderr_held() as discard:
                try:
                    state, data = self.restore(step, target=target, data_state=data_state,
                                               host=host)
                except Exception as e:  # noqa: BLE001 - any failure to read makes it unusable
                    error = e
                    # orbax abandons the step's other reads: let them finish inside the
                    # hold, and drop the hundreds of lines of tracebacks they print.
                    _ignore_abandoned_orbax_reads(self._directory / str(step))
                    gc.collect()
                    time.sleep(0.5)
                    gc.collect()
                    discard()
            if error is not None:
                why = error_summary(error)
                skipped.append((step, why))
                logging.warning("checkpoint %s is unreadable (%s); trying an older step",
                                self._directory / str(step), why)
                continue
            if skipped:
                logging.warning("restored step %d from %s instead of the unreadable step(s) %s",
                                step, self._directory, [s for s, _ in skipped])
            return step, state, data, skipped
        raise UnreadableCheckpointError(
            f"no checkpoint in {self._directory} restores: " + "; ".join(
                f"step {s}: {why}" for s, why in skipped))

    def set_aside(self, step: int) -> str:
        """Renames step directory `step` to `<step>.unreadable-<time>` (kept, not deleted),
        so that the step is no longer a checkpoint and can be saved again.

        Returns:
            The new path. Only the primary process renames; all must call this.
        """
        src = self._directory / str(int(step))
        dst = self._directory / f"{int(step)}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxpost_set_aside_{step}")
        self._manager.reload()
        return os.fspath(dst)

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
    """One complete checkpoint of a training workdir, opened for reading (`open_run`).

    Opened without a step, it stands for the newest checkpoint that reads: the first
    `state()` call (which `params()` and `restore_params()` make) falls back over
    unreadable steps, newest first, warning about each and updating `step`; `skipped`
    lists them. Read the state before the metadata to get the metadata of the step that
    was read. A step asked for explicitly is read or fails (`UnreadableCheckpointError`).
    """

    def __init__(self, workdir: str | os.PathLike, step: int | None = None):
        self.workdir = os.fspath(workdir)
        self.directory = checkpoint_dir(workdir)
        if not self.directory.exists():  # Checkpointer would create it
            raise FileNotFoundError(f"workdir {self.workdir!r} has no {CHECKPOINTS}/ folder "
                                    f"({self.directory}); is it a jaxpost training workdir?")
        self._ckpt = Checkpointer(self.directory, async_save=False)
        self._fallback = step is None
        self.skipped: list[tuple[int, str]] = []  # (step, error) of unreadable newer steps
        try:
            self.step = self._ckpt._resolve_step(step)  # names the directory and the steps
        except BaseException:
            self._ckpt.close()
            raise

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints of the run, ascending."""
        return self._ckpt.all_steps()

    def metadata(self) -> dict:
        """The metadata dict the run stored with this step (config, model config, ...)."""
        try:
            return self._ckpt.metadata(self.step)
        except Exception as e:  # noqa: BLE001 - orbax raises KeyError/ValueError/OSError
            raise UnreadableCheckpointError(
                f"the metadata of checkpoint {self.directory / str(self.step)} is "
                f"unreadable ({error_summary(e)})") from None

    def model_config(self) -> ModelConfig:
        """The `ModelConfig` the run stored in its metadata."""
        return model_config_from_metadata(self.metadata(), where=str(self.directory))

    def state(self) -> Any:
        """The saved train state as nested dicts of host (numpy) arrays: it reads in any
        number of processes, whatever the run that wrote it had.

        Raises:
            UnreadableCheckpointError: the step (asked for explicitly) does not restore,
                or, opened without a step, none does.
        """
        if not self._fallback:
            try:
                state, _ = self._ckpt.restore(self.step, data_state=False, host=True)
            except Exception as e:  # noqa: BLE001
                others = [s for s in self._ckpt.all_steps() if s != self.step]
                raise UnreadableCheckpointError(
                    f"checkpoint {self.directory / str(self.step)} is unreadable "
                    f"({error_summary(e)}); other steps: {others}") from None
            return state
        steps = [s for s in self._ckpt.all_steps() if s <= self.step]
        step, state, _, skipped = self._ckpt.restore_readable(steps=steps, data_state=False,
                                                              host=True)
        self.skipped += skipped
        self.step, self._fallback = step, False  # later calls read this step
        return state

    def params(self) -> dict:
        """The full model params of this step (`params_from_state`)."""
        state = self.state()
        try:
            return params_from_state(state)
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
        # Each process places its own shards of the host arrays (no cross-process check).
        return jax.tree.map(
            lambda x, a, s: jax.make_array_from_callback(
                a.shape, s, lambda index: np.asarray(x[index], a.dtype)),
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
    `checkpoints/` folder, which is not created). Collective under multi-host: every
    process takes process 0's answer to "is there a folder?", since another process may
    be creating it right now (and opening it is itself a collective)."""
    exists = checkpoint_dir(workdir).exists()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    if not exists:
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


class Preempted(BaseException):
    """Raised by `PreemptionGuard` inside an `interruptible()` block when a stop signal
    arrives: a host-side wait (data, rollouts, reward functions, evaluation) is cut short.

    A `BaseException` (like `KeyboardInterrupt`), so that code which wraps errors with
    `except Exception` (reward-function error messages, data readers) lets it through.
    """

    def __init__(self, signum: int | None = None):
        super().__init__(signum)
        self.signum = signum  # the signal, or None for `request()`


class PreemptionGuard:
    """Turns SIGTERM (and SIGINT) into a flag the training loop polls.

    Inside the `with` block the signal handlers only set `requested`; the loop checks
    `should_stop()` (e.g. every step), saves a checkpoint and exits with status 0. The
    previous handlers are restored on exit.

    Host-side waits that may take long (the next batch, GRPO rollouts and reward
    functions, evaluation) run inside `with guard.interruptible():`; there a signal
    raises `Preempted` at once (in the main thread, wherever Python is: a spinning data
    iterator, a `time.sleep`, a lock wait), and so does entering the block once a stop
    is pending. The caller catches it and saves the state it had before the wait. With
    several processes the first signal only sets the flag (a process leaving the lockstep
    alone would hang the others in a collective).

    A second signal while a stop is pending (outside `interruptible()`) runs the previous
    handler: SIGINT by default raises KeyboardInterrupt, SIGTERM by default terminates
    the process (without the pending save; the last complete checkpoint stays usable).
    So pressing Ctrl-C twice, or sending SIGTERM twice, always stops a stuck job.

    Usage::

        with PreemptionGuard() as guard:
            for step in ...:
                try:
                    with guard.interruptible():
                        batch = next(data)
                except Preempted:
                    ckpt.save(step, state, data_state=..., force=True)
                    break
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
        self._depth = 0  # nesting of interruptible() blocks
        self._single: bool | None = None  # one process (known from __enter__ on)

    @property
    def requested(self) -> bool:
        """Whether a stop was requested on this process (by a signal or `request()`)."""
        return self._requested

    def request(self) -> None:
        """Requests a stop as if a signal had arrived (e.g. from a wall-clock budget)."""
        self._requested = True

    def _may_raise(self) -> bool:
        if self._single is None:
            self._single = jax.process_count() == 1
        return self._single

    @contextmanager
    def interruptible(self):
        """A block in which a stop signal raises `Preempted` (one process only)."""
        if self._requested and self._may_raise():
            raise Preempted(self.signal_received)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def _handle(self, signum: int, frame: Any) -> None:
        if self._depth > 0 and self._may_raise():
            if self.signal_received is None:
                self.signal_received = signum
            self._requested = True
            raise Preempted(signum)
        if self._requested:  # a second signal: the user insists
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
                return
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            if previous == signal.SIG_IGN:
                return
            logging.warning("second signal %d while stopping: terminating now", signum)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
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
        self._may_raise()
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
