"""The SFT input pipeline: source -> shuffle -> shard -> tokenize/mask -> pack|pad -> batch.

    it = make_sft_iterator(source, tokenizer, seq_len=64, batch_size=8, seed=0)
    batch = next(it)              # {"tokens", "positions", "segment_ids", "loss_mask"}
    state = it.get_state()        # JSON-serialisable; save it with the checkpoint
    it.set_state(state)           # the batches that follow are exactly those that would have

Stages (grain 0.2.18 dataset API):

1. `grain.MapDataset.source(source)`, shuffled globally by `seed` (`shuffle`), repeated
   `num_epochs` times (None: forever) with a different order every epoch.
2. Sharded per process: this process reads positions `shard_index::shard_count` of the
   shuffled stream (defaults `jax.process_index()` / `jax.process_count()`), so the
   processes partition every epoch. `batch_size` is the per-process batch.
3. Records -> examples (`SFTExampleBuilder`: template, mask, truncation), lazily, in
   `num_threads` reader threads, or in `worker_count` processes when > 0 (default 0).
4. Outcomes are counted (`it.stats`; the counts are part of the iterator state), dropped
   examples removed. Too many dropped examples in a row (`max_consecutive_dropped`, by
   default enough to prove that a whole pass over this process's records was dropped,
   at most 10,000) stop the stream
   with `TooManyDroppedError` naming the reasons, instead of searching forever for an
   example that fits (e.g. `truncation="drop"` with every example longer than `seq_len`).
5. Packed first-fit into rows of `seq_len` (`pack=True`) or padded one per row, then
   batched `[batch_size, seq_len]` (a last partial batch is dropped).

With finite `num_epochs` the shards can end one batch apart; multi-host training should
use `num_epochs=None` and stop after a number of steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from jaxpost.data import packing
from jaxpost.data.sft import (
    DROPPED_NO_TARGETS, DROPPED_TOO_LONG, STATUSES, TRUNCATION_POLICIES, ExampleStats,
    SFTExampleBuilder)
from jaxpost.tokenizer import Tokenizer

STATE_FORMAT = "jaxpost.data.sft_iterator/1"


def default_shard() -> tuple[int, int]:
    """(jax.process_index(), jax.process_count())."""
    import jax

    return jax.process_index(), jax.process_count()


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        di, dc = default_shard()
        shard_index = di if shard_index is None else shard_index
        shard_count = dc if shard_count is None else shard_count
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    return shard_index, shard_count


def record_dataset(
    source: Any,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    shard_block: int = 1,
):
    """Stages 1-2: a `grain.MapDataset` of this process's records, shuffled per epoch.

    Args:
        source: random-access source (`len`, `__getitem__`).
        seed: shuffle seed (0 <= seed < 2**32).
        shuffle: shuffle globally (differently each epoch).
        num_epochs: passes over the data; None repeats forever.
        shard_index: this process's shard (default `jax.process_index()`).
        shard_count: number of shards (default `jax.process_count()`).
        shard_block: shards take turns in blocks of this many consecutive positions
            (1: position `i` goes to shard `i % shard_count`).

    Returns:
        `grain.MapDataset` of records.
    """
    if len(source) == 0:
        raise ValueError(f"source {source!r} is empty")
    shard_index, shard_count = _resolve_shard(shard_index, shard_count)
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if shard_block < 1:
        raise ValueError(f"shard_block={shard_block} must be >= 1")
    if shard_count > 1:
        ds = (ds[shard_index::shard_count] if shard_block == 1
              else _BlockShard(ds, shard_index, shard_count, shard_block))
    return ds


class _BlockShard(grain.MapDataset):
    """Shard `index` of `count`: blocks of `block` consecutive positions, dealt in turn."""

    def __init__(self, parent, index: int, count: int, block: int):
        super().__init__(parent)
        self._index, self._count, self._block = index, count, block
        self._length = len(parent) // (count * block) * block

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        turn, offset = divmod(i, self._block)
        return self._parent[(turn * self._count + self._index) * self._block + offset]

    def __str__(self) -> str:
        return f"_BlockShard(index={self._index}, count={self._count}, block={self._block})"


# --------------------------------------------------------------------------- counting stage


DEFAULT_MAX_CONSECUTIVE_DROPPED = 10_000


class TooManyDroppedError(ValueError):
    """Every one of many consecutive examples was dropped: the stream cannot fill a batch."""


class _TallyIterDataset(grain.IterDataset):
    """Counts example outcomes into `stats`, drops the dropped examples, and stops after
    `max_dropped` dropped examples in a row (`describe`: the options, for the error)."""

    def __init__(self, parent, stats: ExampleStats, max_dropped: int, describe: str = ""):
        super().__init__(parent)
        self._counts = stats
        self._max_dropped = max_dropped
        self._describe = describe

    def __iter__(self):
        return _TallyIterator(self._parent.__iter__(), self._counts, self._max_dropped,
                              self._describe)


class _TallyIterator(grain.DatasetIterator):
    """The counts are part of the state, so a restored iterator reports the same counts."""

    def __init__(self, parent, stats: ExampleStats, max_dropped: int, describe: str):
        super().__init__(parent)
        self._counts = stats
        self._max_dropped = max_dropped
        self._describe = describe

    def __next__(self):
        run: dict[str, int] = {}  # why the examples of the current run were dropped
        while True:
            ex = next(self._parent)
            self._counts.add(ex["status"])
            if len(ex["tokens"]):
                return {"tokens": ex["tokens"], "loss_mask": ex["loss_mask"]}
            run[ex["status"]] = run.get(ex["status"], 0) + 1
            if sum(run.values()) >= self._max_dropped:
                raise TooManyDroppedError(_dropped_message(run, self._describe))

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "counts": self._counts.to_dict()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counts.load(state["counts"])


def _dropped_message(run: Mapping[str, int], describe: str) -> str:
    total = sum(run.values())
    parts = []
    if run.get(DROPPED_TOO_LONG):
        parts.append(f"{run[DROPPED_TOO_LONG]} longer than the row length with "
                     "truncation='drop' (raise data.seq_len, or use "
                     "data.truncation='truncate_right' / 'truncate_left')")
    if run.get(DROPPED_NO_TARGETS):
        parts.append(f"{run[DROPPED_NO_TARGETS]} with no target token left (the prompt "
                     "fills the row, or the records have no completion / assistant turn)")
    return (f"{total} examples in a row were dropped, so no batch can be filled: "
            + "; ".join(parts) + (f" [{describe}]" if describe else ""))


# --------------------------------------------------------------------------- SFT pipeline


@dataclasses.dataclass(frozen=True)
class SFTDataOptions:
    """How SFT records become batches (everything but the source and the tokenizer)."""

    seq_len: int  # row length T of every batch
    batch_size: int  # rows per batch on this process (global batch / process count)
    pack: bool = True  # first-fit pack several examples per row; False: one per row
    seed: int = 0  # shuffle seed; the same seed gives the same order
    shuffle: bool = True  # global shuffle, reshuffled each epoch
    num_epochs: int | None = None  # None: repeat forever (stop by steps)
    truncation: str = "truncate_right"  # "truncate_right" | "truncate_left" | "drop"
    max_len: int | None = None  # longest example kept (default seq_len)
    add_bos: bool | None = None  # prompt/completion: BOS first (None: tokenizer default)
    add_eos: bool | None = None  # EOS after the completion (None: see jaxpost.data.sft)
    num_packing_bins: int | None = None  # rows open while packing (default batch_size)
    shard_index: int | None = None  # default jax.process_index()
    shard_count: int | None = None  # default jax.process_count()
    num_threads: int = 1  # reader threads tokenizing ahead (0: synchronous)
    prefetch_buffer_size: int = 64  # examples tokenized ahead by the reader threads
    worker_count: int = 0  # >0: tokenize in that many processes (grain mp_prefetch)
    max_consecutive_dropped: int | None = None  # stop after this many dropped in a row (None: two passes over this process's records, at most 10,000)

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got seq_len="
                             f"{self.seq_len}, batch_size={self.batch_size}")
        if self.max_len is not None and not 2 <= self.max_len <= self.seq_len:
            raise ValueError(f"max_len={self.max_len} must be in [2, seq_len={self.seq_len}]")
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation={self.truncation!r}; expected one of "
                             f"{TRUNCATION_POLICIES}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs={self.num_epochs}; expected None (forever) or >= 1")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed} must be in [0, 2**32)")
        if self.max_consecutive_dropped is not None and self.max_consecutive_dropped < 1:
            raise ValueError(f"max_consecutive_dropped={self.max_consecutive_dropped}; "
                             "expected None or >= 1")


def make_sft_dataset(source: Any, tokenizer: Tokenizer, options: SFTDataOptions,
                     stats: ExampleStats | None = None):
    """The whole pipeline as a `grain.IterDataset` of batches (see module docstring).

    Args:
        source: random-access source of SFT records.
        tokenizer: the tokenizer.
        options: pipeline options.
        stats: counts of example outcomes, updated as the dataset is iterated (one
            iterator per stats object).

    Returns:
        `grain.IterDataset` yielding batches `{"tokens", "positions", "segment_ids",
        "loss_mask"}`, each `[batch_size, seq_len]`.
    """
    o = options
    max_len = o.seq_len if o.max_len is None else o.max_len
    builder = SFTExampleBuilder(tokenizer, max_len, truncation=o.truncation,
                                add_bos=o.add_bos, add_eos=o.add_eos)
    ds = record_dataset(source, seed=o.seed, shuffle=o.shuffle, num_epochs=o.num_epochs,
                        shard_index=o.shard_index, shard_count=o.shard_count)
    ds = ds.map(builder).to_iter_dataset(
        grain.ReadOptions(num_threads=o.num_threads,
                          prefetch_buffer_size=o.prefetch_buffer_size if o.num_threads else 0))
    if o.worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an
            flags.FLAGS.mark_as_parsed()  # absl app (tests, notebooks) use the defaults
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=o.worker_count))
    max_dropped = o.max_consecutive_dropped
    if max_dropped is None:
        _, count = _resolve_shard(o.shard_index, o.shard_count)
        per_pass = -(-len(source) // count)  # this process's records per epoch
        # Without a fully dropped pass, a run of drops spans at most the end of one pass
        # and the start of the next (2 * per_pass - 2): one more proves every record drops.
        max_dropped = min(2 * per_pass - 1, DEFAULT_MAX_CONSECUTIVE_DROPPED)
    describe = f"seq_len={o.seq_len}, max_len={max_len}, truncation={o.truncation!r}"
    ds = _TallyIterDataset(ds, stats if stats is not None else ExampleStats(), max_dropped,
                           describe)
    if o.pack:
        rows = packing.pack_iter_dataset(ds, o.seq_len, num_bins=o.num_packing_bins or
                                         o.batch_size, pad_id=tokenizer.pad_id)
    else:
        rows = packing.pad_iter_dataset(ds, o.seq_len, pad_id=tokenizer.pad_id)
    return rows.batch(o.batch_size, drop_remainder=True, batch_fn=packing.stack_rows)


class SFTBatchIterator:
    """Iterator of SFT batches with a checkpointable, JSON-serialisable state.

    Create with `make_sft_iterator`. `next(it)` returns a batch dict of numpy arrays;
    `get_state()` / `set_state(state)` save and restore the position (resuming yields
    exactly the batches that would have followed); `stats` counts example outcomes.
    """

    def __init__(self, source: Any, tokenizer: Tokenizer, options: SFTDataOptions):
        self.options = options
        self.stats = ExampleStats()
        self._dataset = make_sft_dataset(source, tokenizer, options, self.stats)
        self._it = iter(self._dataset)

    def __iter__(self) -> SFTBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """The position in the stream, as a JSON-serialisable dict."""
        return {"format": STATE_FORMAT, "options": _options_fingerprint(self.options),
                "grain": _jsonable(self._it.get_state())}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a position saved by `get_state` (of an iterator built the same way)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an SFT iterator state (format {state.get('format')!r}, "
                             f"expected {STATE_FORMAT!r})")
        mine = _options_fingerprint(self.options)
        if state.get("options") != mine:
            raise ValueError(
                "the saved data-iterator state was made with different data options "
                f"({state.get('options')}) than this iterator ({mine}); restoring it would "
                "not resume the same stream")
        self._it.set_state(state["grain"])

    def close(self) -> None:
        """Stops worker processes/threads, if any."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def _options_fingerprint(o: SFTDataOptions) -> dict[str, Any]:
    # Options that change which batches come out; thread counts do not.
    keep = ("seq_len", "batch_size", "pack", "seed", "shuffle", "num_epochs", "truncation",
            "max_len", "add_bos", "add_eos", "num_packing_bins", "shard_index",
            "shard_count", "worker_count")
    d = dataclasses.asdict(o)
    return {k: d[k] for k in keep}


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, bytes):
        raise TypeError("grain iterator state holds bytes; cannot make it JSON")
    return x


def make_sft_iterator(
    source: Any,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    **options: Any,
) -> SFTBatchIterator:
    """The SFT batch iterator the trainer calls.

    Args:
        source: random-access source of SFT records (`jaxpost.data.sources`).
        tokenizer: the tokenizer (`jaxpost.tokenizer.load_tokenizer`).
        seq_len: row length T.
        batch_size: rows per batch on this process.
        **options: any other field of `SFTDataOptions` (pack, seed, shuffle, num_epochs,
            truncation, shard_index, shard_count, ...).

    Returns:
        `SFTBatchIterator` with `next`, `get_state`, `set_state`, `stats`.
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(SFTDataOptions)}
    if unknown:
        raise TypeError(f"unknown SFT data options {sorted(unknown)}; known: "
                        f"{[f.name for f in dataclasses.fields(SFTDataOptions)]}")
    opts = SFTDataOptions(seq_len=seq_len, batch_size=batch_size, **options)
    return SFTBatchIterator(source, tokenizer, opts)


__all__ = ["SFTDataOptions", "SFTBatchIterator", "TooManyDroppedError", "make_sft_dataset", "make_sft_iterator",
           "record_dataset", "default_shard", "STATUSES"]
