"""Random-access record sources for grain: JSONL, ArrayRecord, TFDS, in-memory lists.

Every source has `len(source)` and `source[i] -> dict`, which is all
`grain.MapDataset.source(...)` needs. A record is a plain dict of Python values: an SFT
record has either `prompt` and `completion` (strings, or lists of chat messages) or
`messages` (a list of `{"role": ..., "content": ...}`); other fields are kept and reach
reward functions as columns.

`validate_record(record, schema)` is the one check of that shape; `JsonlSource` runs it on
every line when opened, so a bad line fails at start-up, naming file and line, instead of
hours into training (or is skipped and counted with `skip_malformed=True`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Record = dict[str, Any]

#: Record shapes `validate_record` knows: "sft" (prompt+completion or messages), "prompt"
#: (prompt or messages, for generation/RL), None (any JSON object).
SCHEMAS = ("sft", "prompt", None)


class MalformedRecordError(ValueError):
    """A record is not valid JSON or does not have the expected fields."""


def _message_list_problem(value: Any, field: str) -> str | None:
    if not isinstance(value, list) or not value:
        return f"'{field}' must be a non-empty list of {{'role': str, 'content': str}}"
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            return f"'{field}[{i}]' is {type(m).__name__}, expected an object"
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"'{field}[{i}]' needs string 'role' and 'content', got keys {sorted(m)}"
    return None


def validate_record(record: Any, schema: str | None = "sft") -> str | None:
    """Checks a record's shape.

    Args:
        record: the decoded record.
        schema: "sft" (needs `prompt` and `completion`, or `messages`), "prompt" (needs
            `prompt` or `messages`) or None (any object).

    Returns:
        None if valid, else a message that says what is wrong and what is expected.
    """
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; expected one of {SCHEMAS}")
    if not isinstance(record, Mapping):
        return f"record is a JSON {type(record).__name__}, expected an object"
    if schema is None:
        return None
    if "messages" in record:
        return _message_list_problem(record["messages"], "messages")
    if "prompt" not in record or (schema == "sft" and "completion" not in record):
        need = "'prompt' and 'completion'" if schema == "sft" else "'prompt'"
        return f"record has keys {sorted(record)}; expected {need}, or 'messages'"
    fields = ("prompt", "completion") if schema == "sft" else ("prompt",)
    kinds = set()
    for f in fields:
        v = record[f]
        if isinstance(v, str):
            kinds.add("text")
        elif isinstance(v, list):
            problem = _message_list_problem(v, f)
            if problem:
                return problem
            kinds.add("chat")
        else:
            return f"'{f}' is {type(v).__name__}, expected a string or a list of messages"
    if len(kinds) > 1:
        return "'prompt' and 'completion' must both be strings or both be message lists"
    return None


def _renamed(record: Record, rename: Mapping[str, str] | None) -> Record:
    if not rename:
        return record
    return {rename.get(k, k): v for k, v in record.items()}


@dataclasses.dataclass
class SourceStats:
    """What opening a source found."""

    num_records: int = 0  # usable records (len(source))
    num_malformed: int = 0  # lines skipped because malformed (skip_malformed=True only)
    num_blank: int = 0  # blank lines, always skipped
    examples: list[str] = dataclasses.field(default_factory=list)  # first few problems


# --------------------------------------------------------------------------- in memory


class InMemorySource:
    """A list of records held in memory (synthetic data, tests, small eval sets).

    Args:
        records: the records (dicts).
        schema: checked on every record at construction ("sft", "prompt" or None).
    """

    def __init__(self, records: Sequence[Record], schema: str | None = None):
        self._records = list(records)
        for i, r in enumerate(self._records):
            problem = validate_record(r, schema)
            if problem:
                raise MalformedRecordError(f"record {i}: {problem}")
        self.stats = SourceStats(num_records=len(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:
        return self._records[index]

    def __repr__(self) -> str:
        return f"InMemorySource({len(self)} records)"


# --------------------------------------------------------------------------- JSONL


class JsonlSource:
    """Records from JSON Lines files, random access by byte offset.

    All lines are parsed and checked once when the source is opened; only the byte
    offsets of the good lines are kept, and `source[i]` re-reads and decodes one line
    (`os.pread`, safe with grain's reader threads and picklable for worker processes).

    Args:
        paths: one path or several; records are numbered file by file, in order.
        schema: record shape to check (see `validate_record`).
        skip_malformed: False (default): the first bad line raises
            `MalformedRecordError` naming file and line number. True: bad lines are
            skipped and counted in `self.stats.num_malformed`, and a warning is logged.
        rename: optional field renames applied before checking, e.g.
            `{"question": "prompt", "answer": "completion"}`.
        skip_hint: how the caller's user turns skipping on, quoted in the error (a
            recipe passes its config key, e.g. "pass --config.data.skip_malformed=True").
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        schema: str | None = "sft",
        skip_malformed: bool = False,
        rename: Mapping[str, str] | None = None,
        skip_hint: str = "open the source with skip_malformed=True",
    ):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self._paths = [os.fspath(p) for p in paths]
        if not self._paths:
            raise ValueError("JsonlSource needs at least one path")
        self._rename = dict(rename or {})
        self._schema = schema
        self.stats = SourceStats()
        file_idx, starts, lengths, line_nos = [], [], [], []
        for fi, path in enumerate(self._paths):
            with open(path, "rb") as f:
                offset = 0
                for line_no, raw in enumerate(f, start=1):
                    start, offset = offset, offset + len(raw)
                    if not raw.strip():
                        self.stats.num_blank += 1
                        continue
                    problem = self._check(raw)
                    if problem:
                        where = f"{path}:{line_no}: {problem}"
                        if not skip_malformed:
                            raise MalformedRecordError(
                                f"{where} (fix the line, or {skip_hint} to skip and count "
                                "bad lines)")
                        self.stats.num_malformed += 1
                        if len(self.stats.examples) < 10:
                            self.stats.examples.append(where)
                        continue
                    file_idx.append(fi)
                    starts.append(start)
                    lengths.append(len(raw))
                    line_nos.append(line_no)
        self._file_idx = np.asarray(file_idx, np.int32)
        self._starts = np.asarray(starts, np.int64)
        self._lengths = np.asarray(lengths, np.int64)
        self._line_nos = np.asarray(line_nos, np.int64)
        self.stats.num_records = len(starts)
        if self.stats.num_malformed:
            logging.warning(
                "JsonlSource skipped %d malformed line(s) of %s, first: %s",
                self.stats.num_malformed, self._paths, self.stats.examples[:3])
        self._fds: dict[int, int] = {}
        self._fd_pid = -1
        self._lock = threading.Lock()

    def _check(self, raw: bytes) -> str | None:
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"not valid JSON ({e})"
        if isinstance(record, dict):
            record = _renamed(record, self._rename)
        return validate_record(record, self._schema)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"], state["_fd_pid"], state["_lock"] = {}, -1, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _fd(self, file_index: int) -> int:
        with self._lock:
            if self._fd_pid != os.getpid():  # forked: descriptors are not ours to share
                self._fds, self._fd_pid = {}, os.getpid()
            fd = self._fds.get(file_index)
            if fd is None:
                fd = os.open(self._paths[file_index], os.O_RDONLY)
                self._fds[file_index] = fd
            return fd

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __len__(self) -> int:
        return len(self._starts)

    def location(self, index: int) -> tuple[str, int]:
        """(file path, 1-based line number) of record `index`."""
        return self._paths[self._file_idx[index]], int(self._line_nos[index])

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        index %= len(self)
        fi = int(self._file_idx[index])
        raw = os.pread(self._fd(fi), int(self._lengths[index]), int(self._starts[index]))
        return _renamed(json.loads(raw), self._rename)

    def __repr__(self) -> str:
        return f"JsonlSource({self._paths}, {len(self)} records)"


# --------------------------------------------------------------------------- ArrayRecord


def write_array_record(path: str | os.PathLike, records: Iterable[Record]) -> int:
    """Writes records as JSON bytes to one ArrayRecord file (for `ArrayRecordSource`).

    Args:
        path: output file, conventionally ending in `.array_record`.
        records: JSON-serialisable dicts.

    Returns:
        The number of records written.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    n = 0
    try:
        for r in records:
            writer.write(json.dumps(r, ensure_ascii=False).encode("utf-8"))
            n += 1
    finally:
        writer.close()
    return n


class ArrayRecordSource:
    """Records stored as JSON bytes in ArrayRecord files.

    Records are decoded when read; a record that is not JSON, or does not match
    `schema`, raises `MalformedRecordError` naming file and record index (ArrayRecord
    files are written by programs, so a bad record is a bug to fix, not noise to skip).

    Args:
        paths: one path or several; records are numbered file by file, in order.
        schema: record shape to check on read (see `validate_record`).
        rename: optional field renames applied before checking.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        schema: str | None = "sft",
        rename: Mapping[str, str] | None = None,
    ):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self._paths = [os.fspath(p) for p in paths]
        if not self._paths:
            raise ValueError("ArrayRecordSource needs at least one path")
        for p in self._paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"ArrayRecord file {p!r} does not exist")
        self._sources = [ArrayRecordDataSource(p) for p in self._paths]
        self._ends = np.cumsum([len(s) for s in self._sources])
        self._schema = schema
        self._rename = dict(rename or {})
        self.stats = SourceStats(num_records=len(self))

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        index %= len(self)
        fi = int(np.searchsorted(self._ends, index, side="right"))
        local = index - (int(self._ends[fi - 1]) if fi else 0)
        raw = self._sources[fi][local]
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MalformedRecordError(
                f"{self._paths[fi]} record {local}: not valid JSON ({e}); ArrayRecordSource "
                "expects each record to be a UTF-8 JSON object (see write_array_record)"
            ) from e
        if isinstance(record, dict):
            record = _renamed(record, self._rename)
        problem = validate_record(record, self._schema)
        if problem:
            raise MalformedRecordError(f"{self._paths[fi]} record {local}: {problem}")
        return record

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self._paths}, {len(self)} records)"


# --------------------------------------------------------------------------- TFDS


def _to_python(value: Any) -> Any:
    """TFDS numpy values to plain Python: bytes -> str, arrays -> lists, dict-of-lists of
    equal length (a `tfds.features.Sequence` of a dict) -> list of dicts."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return _to_python(value.item())
        return [_to_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if isinstance(value, Mapping):
        out = {k: _to_python(v) for k, v in value.items()}
        lists = list(out.values())
        if lists and all(isinstance(v, list) for v in lists) and len(
                {len(v) for v in lists}) == 1:
            return [dict(zip(out, row)) for row in zip(*lists)]
        return out
    return value


class TfdsSource:
    """A TFDS dataset stored as array_record, read through `tfds.data_source`.

    Needs no TensorFlow. Text features (bytes) become `str`, a
    `tfds.features.Sequence({"role": Text, "content": Text})` becomes a list of message
    dicts, numpy scalars become Python numbers.

    Args:
        name: TFDS dataset name (e.g. "gsm8k" or "my_dataset:1.0.0").
        split: split spec, e.g. "train" or "train[:90%]".
        data_dir: folder that holds the prepared dataset (no download is attempted).
        schema: record shape to check on read (see `validate_record`).
        rename: field renames, e.g. `{"question": "prompt", "answer": "completion"}`.
        data_source: an object with `len` and `__getitem__` to use instead of calling
            `tfds.data_source` (tests, or a source built elsewhere).
    """

    def __init__(
        self,
        name: str,
        *,
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        schema: str | None = "sft",
        rename: Mapping[str, str] | None = None,
        data_source: Any = None,
    ):
        if data_source is None:
            import tensorflow_datasets as tfds

            data_source = tfds.data_source(
                name, split=split, data_dir=None if data_dir is None else os.fspath(data_dir),
                download=False)
        self._ds = data_source
        self._name, self._split = name, split
        self._schema = schema
        self._rename = dict(rename or {})
        self.stats = SourceStats(num_records=len(self._ds))

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> Record:
        record = _to_python(self._ds[int(index)])
        if isinstance(record, dict):
            record = _renamed(record, self._rename)
        problem = validate_record(record, self._schema)
        if problem:
            raise MalformedRecordError(
                f"TFDS {self._name} split {self._split!r} record {index}: {problem} "
                "(use rename= to map the dataset's fields)")
        return record

    def __repr__(self) -> str:
        return f"TfdsSource({self._name!r}, split={self._split!r}, {len(self)} records)"


# --------------------------------------------------------------------------- helpers


class MappedSource:
    """A source whose records pass through `fn` (e.g. to build `messages` from columns).

    Args:
        source: any source.
        fn: record -> record; must be deterministic and picklable for worker processes.
    """

    def __init__(self, source: Any, fn: Callable[[Record], Record]):
        self._source, self._fn = source, fn
        self.stats = getattr(source, "stats", SourceStats(num_records=len(source)))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        return self._fn(self._source[index])


def open_source(
    spec: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    schema: str | None = "sft",
    skip_malformed: bool = False,
    rename: Mapping[str, str] | None = None,
    num_records: int = 20_000,
    seed: int = 0,
    skip_hint: str = "open the source with skip_malformed=True",
) -> Any:
    """Opens a source from a config string.

    Args:
        spec: one of
            `"PATH.jsonl"` (or a glob, or several joined by ","): `JsonlSource`;
            `"PATH.array_record"` (or a glob, or a list joined by ","): `ArrayRecordSource`;
            `"tfds:NAME"`: `TfdsSource` of `split` under `data_dir`;
            `"synthetic:addition"` (or `"synthetic:addition:D"`, operands of at most D
            digits, default 3): `num_records` addition chats of `split`
            ("train" or "heldout") drawn with `seed`; `"synthetic:mention[:KEEP]"`:
            the mention task of `jaxpost.data.mention`.
        split: TFDS or synthetic split.
        data_dir: TFDS data folder.
        schema: record shape to check ("sft", "prompt" or None).
        skip_malformed: JSONL only: skip and count bad lines instead of failing.
        rename: field renames (file sources).
        num_records: synthetic only.
        seed: synthetic only.
        skip_hint: JSONL only: how to turn skipping on, quoted in a malformed-line error.

    Returns:
        The source.
    """
    import glob

    if spec.startswith("synthetic:mention"):
        from jaxpost.data import mention

        return mention.mention_source(num_records, seed=seed, split=split,
                                      keep=mention.parse_spec(spec))
    if spec.startswith("synthetic:"):
        from jaxpost.data import synthetic

        return synthetic.addition_source(num_records, seed=seed, split=split,
                                         max_digits=synthetic.parse_spec(spec))
    if spec.startswith("tfds:"):
        return TfdsSource(spec[5:], split=split, data_dir=data_dir, schema=schema,
                          rename=rename)
    paths: list[str] = []
    for part in spec.split(","):
        matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        if not matches:
            raise FileNotFoundError(f"no file matches {part!r}")
        paths.extend(matches)
    if all(p.endswith((".jsonl", ".json")) for p in paths):
        return JsonlSource(paths, schema=schema, skip_malformed=skip_malformed, rename=rename,
                           skip_hint=skip_hint)
    if all(".array_record" in os.path.basename(p) for p in paths):
        return ArrayRecordSource(paths, schema=schema, rename=rename)
    raise ValueError(
        f"cannot tell the format of {spec!r}: expected .jsonl files, .array_record files, "
        "'tfds:NAME' or 'synthetic:addition'")
