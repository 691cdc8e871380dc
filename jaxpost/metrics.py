"""Training metrics: `metrics.jsonl`, TensorBoard scalars and a console progress line.

`MetricsWriter.write(step, metrics)` appends one JSON object per call to
`workdir/metrics.jsonl`, e.g.::

    {"step": 100, "loss": 2.3125, "learning_rate": 1e-05, "tokens_per_s": 51234.5}

Values: jax/numpy scalars become Python numbers (integer dtypes stay ints, bools
become ints, everything else floats). Non-finite floats are written as the strings
`"NaN"`, `"Infinity"` and `"-Infinity"`, so every line stays strict JSON and `float(v)`
reads them back; TensorBoard gets the float itself. Only process 0 writes anything.
On resume the file is appended to. Opened with `keep_through_step=N` (the training loop
passes the step it resumed from, or -1 for a fresh start), records of later steps are
removed first: they were logged after the checkpoint the run resumes from, and the run
writes those steps again, so each step appears once. A torn last line (a run killed
mid-write) is repaired.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from typing import Any, Mapping, TextIO

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
_BAR_WIDTH = 20


def _summary_writer_class() -> type:
    """`tensorboardX.SummaryWriter`, imported lazily without dragging in PyTorch.

    tensorboardX tries `import torch` at import time only to recognise torch tensors in
    its inputs (7 s and hundreds of MB where torch is installed). We only log Python
    floats, so unless torch is already loaded the import is shadowed for that moment.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def to_python_scalar(value: Any, name: str = "value") -> int | float:
    """A jax/numpy/Python scalar as a Python int (integer or bool dtypes) or float.

    Raises:
        TypeError: if `value` is not a scalar number (e.g. an array of several elements).
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    try:
        arr = np.asarray(jax.device_get(value))
    except Exception as e:  # noqa: BLE001 - anything unconvertible is a caller bug
        raise TypeError(
            f"metric {name!r}: cannot convert {type(value).__name__} to a number") from e
    if arr.size != 1 or arr.dtype.kind not in "biuf":
        raise TypeError(f"metric {name!r}: expected a scalar number, got {type(value).__name__} "
                        f"of shape {arr.shape} and dtype {arr.dtype}")
    item = arr.reshape(()).item()
    return int(item) if arr.dtype.kind in "biu" else float(item)


def _json_value(value: int | float) -> int | float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def _format_number(value: float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _drop_records_after(path: str, last_step: int) -> int:
    """Rewrites the jsonl file at `path` without the records of steps after `last_step`
    (and without a torn, unparsable last line); returns how many lines were removed. The
    rewrite is atomic (a temporary file renamed over the original)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    kept = []
    for i, line in enumerate(lines):
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            if i == len(lines) - 1:
                continue  # torn by a kill mid-write
            kept.append(line)  # not ours to judge
            continue
        if not isinstance(step, int) or step <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    removed = len(lines) - len(kept)
    if removed:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return removed


class MetricsWriter:
    """Writes metrics of a training run to jsonl, TensorBoard and the console.

    Usage::

        with MetricsWriter(workdir, total_steps=cfg.steps) as writer:
            writer.write(step, {"loss": loss, "tokens_per_s": tps})
    """

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int,
                 tensorboard: bool = True, console: bool = True,
                 process_index: int | None = None, stream: TextIO | None = None,
                 keep_through_step: int | None = None):
        """Opens the writers (only on process 0; elsewhere every call is a no-op).

        Args:
            workdir: Run directory; gets `metrics.jsonl` and the TensorBoard event files.
            total_steps: Total optimizer steps of the run (for the bar and the ETA).
            tensorboard: Also write TensorBoard scalars (tensorboardX).
            console: Also print one progress line per `write`.
            process_index: This process' index; default `jax.process_index()`.
            stream: Where the console line goes; default `sys.stdout` at write time.
            keep_through_step: If given, first remove the records of `metrics.jsonl`
                whose step is greater (and a torn last line); None keeps every line.
        """
        self._workdir = os.fspath(workdir)
        self._total = int(total_steps)
        self._console = console
        self._stream = stream
        index = jax.process_index() if process_index is None else process_index
        self._active = index == 0
        self._closed = False
        self._jsonl: TextIO | None = None
        self._tb = None
        self._first: tuple[int, float] | None = None  # (step, time) of the first write
        self._start_time = time.monotonic()
        if not self._active:
            return
        os.makedirs(self._workdir, exist_ok=True)
        path = os.path.join(self._workdir, METRICS_FILE)
        if keep_through_step is not None and os.path.exists(path):
            _drop_records_after(path, int(keep_through_step))
        torn = False  # a run killed mid-line leaves no trailing newline
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if torn:
            self._jsonl.write("\n")
        if tensorboard:
            self._tb = _summary_writer_class()(logdir=self._workdir, flush_secs=30)

    @property
    def path(self) -> str:
        """The path of `metrics.jsonl`."""
        return os.path.join(self._workdir, METRICS_FILE)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs `metrics` of `step` to every enabled sink (process 0 only).

        Args:
            step: The optimizer step the metrics belong to.
            metrics: Name -> scalar (Python, numpy or jax). `"loss"` and
                `"tokens_per_s"` (and `"reward_mean"`) are shown on the console line.

        Raises:
            TypeError: if a value is not a scalar number.
            ValueError: if a metric is named `"step"`.
        """
        if self._closed:
            raise RuntimeError(f"MetricsWriter({self._workdir!r}) is closed")
        if not self._active:
            return
        if "step" in metrics:
            raise ValueError("metrics must not contain 'step'; it is passed separately")
        step = int(step)
        values = {k: to_python_scalar(v, k) for k, v in metrics.items()}
        record = {"step": step, **{k: _json_value(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
        if self._console:
            print(self._progress_line(step, values), file=self._stream or sys.stdout, flush=True)

    def _progress_line(self, step: int, values: Mapping[str, int | float]) -> str:
        now = time.monotonic()
        if self._first is None:
            self._first = (step, now)
        first_step, first_time = self._first
        width = len(str(self._total))
        fraction = min(max(step / self._total, 0.0), 1.0) if self._total > 0 else 1.0
        filled = int(round(fraction * _BAR_WIDTH))
        parts = [f"step {step:>{width}}/{self._total} "
                 f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {100 * fraction:5.1f}%"]
        for key, label in (("loss", "loss"), ("reward_mean", "reward")):
            if key in values:
                parts.append(f"{label} {_format_number(values[key])}")
        if "tokens_per_s" in values:
            parts.append(f"{_format_number(values['tokens_per_s'])} tok/s")
        parts.append(f"elapsed {_format_duration(now - self._start_time)}")
        if step > first_step and now > first_time:
            seconds_per_step = (now - first_time) / (step - first_step)
            parts.append(f"ETA {_format_duration(max(self._total - step, 0) * seconds_per_step)}")
        else:
            parts.append("ETA --:--:--")
        return " | ".join(parts)

    def flush(self) -> None:
        """Flushes the jsonl file and TensorBoard events."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes all sinks; writing afterwards raises RuntimeError."""
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
