"""Rows of length T from variable-length examples: first-fit packing, or padding.

A row (and a batch, stacked rows) follows the batch convention of `jaxpost.data`:

    tokens       int32    token ids; `pad_id` in padding
    positions    int32    RoPE positions, 0, 1, ... restarting for each packed example
    segment_ids  int32    0 = padding, 1..k = the k-th example packed into the row
    loss_mask    float32  1.0 where tokens[t] is a target predicted from t-1 (same segment)

Packing is first-fit over a window of `num_bins` rows: each example goes into the first
row with room; when one fits in none, the window's rows are emitted in order and a new
window starts with it. An example is never split. The streaming version used by the
pipeline (`pack_iter_dataset`) is a grain `IterDataset` with a checkpointable state;
`pack_examples` is its in-memory twin, and the tests pin that both agree. (grain's own
`experimental.FirstFitPackIterDataset` implements the same algorithm; it is not used
because it cost about 0.8 ms of Python per example here, more than tokenizing, which
roughly halved the data rate of the CPU demo.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import grain
import numpy as np

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")
BATCH_DTYPES = {"tokens": np.int32, "positions": np.int32, "segment_ids": np.int32,
                "loss_mask": np.float32}


def _check_example(ex: Mapping[str, np.ndarray], seq_len: int, i: int) -> int:
    n = len(ex["tokens"])
    if len(ex["loss_mask"]) != n:
        raise ValueError(f"example {i}: tokens has length {n} but loss_mask has "
                         f"{len(ex['loss_mask'])}")
    if n == 0:
        raise ValueError(f"example {i} is empty; drop empty examples before batching")
    if n > seq_len:
        raise ValueError(f"example {i} has {n} tokens, more than the row length {seq_len}; "
                         "truncate it first (jaxpost.data.sft.truncate)")
    return n


def _empty_rows(num_rows: int, seq_len: int, pad_id: int) -> Batch:
    return {
        "tokens": np.full((num_rows, seq_len), pad_id, np.int32),
        "positions": np.zeros((num_rows, seq_len), np.int32),
        "segment_ids": np.zeros((num_rows, seq_len), np.int32),
        "loss_mask": np.zeros((num_rows, seq_len), np.float32),
    }


def _place(rows: Batch, r: int, start: int, segment: int, ex: Mapping[str, np.ndarray]):
    n = len(ex["tokens"])
    sl = slice(start, start + n)
    rows["tokens"][r, sl] = ex["tokens"]
    rows["positions"][r, sl] = np.arange(n, dtype=np.int32)
    rows["segment_ids"][r, sl] = segment
    rows["loss_mask"][r, sl] = ex["loss_mask"]
    rows["loss_mask"][r, start] = 0.0  # nothing predicts a segment's first token


def pad_examples(
    examples: Sequence[Mapping[str, np.ndarray]], seq_len: int, pad_id: int = 0
) -> Batch:
    """One example per row, padded to `seq_len` (the non-packed batcher).

    Args:
        examples: `{"tokens", "loss_mask"}` dicts, each at most `seq_len` long.
        seq_len: row length T.
        pad_id: token id written into padding.

    Returns:
        A batch `[len(examples), seq_len]` in the batch convention (segment id 1 on
        tokens, 0 on padding).
    """
    rows = _empty_rows(len(examples), seq_len, pad_id)
    for i, ex in enumerate(examples):
        _check_example(ex, seq_len, i)
        _place(rows, i, 0, 1, ex)
    return rows


def pack_examples(
    examples: Iterable[Mapping[str, np.ndarray]],
    seq_len: int,
    *,
    num_bins: int | None = None,
    pad_id: int = 0,
) -> Batch:
    """First-fit packs examples into rows of `seq_len`; deterministic, never splits one.

    Args:
        examples: `{"tokens", "loss_mask"}` dicts, each at most `seq_len` long.
        seq_len: row length T.
        num_bins: rows open at a time. None: all rows stay open (offline first-fit,
            densest). An int: the streaming algorithm of the pipeline (when an example
            fits in none of the open rows, they are emitted and a new window begins).
        pad_id: token id written into padding.

    Returns:
        A batch `[num_rows, seq_len]` in the batch convention.
    """
    if num_bins is not None and num_bins < 1:
        raise ValueError(f"num_bins must be positive or None, got {num_bins}")
    done: list[list[Mapping[str, np.ndarray]]] = []
    window: list[list[Mapping[str, np.ndarray]]] = []
    fill: list[int] = []
    for i, ex in enumerate(examples):
        n = _check_example(ex, seq_len, i)
        row = next((r for r, f in enumerate(fill) if f + n <= seq_len), None)
        if row is None and num_bins is not None and len(window) == num_bins:
            done.extend(window)
            window, fill = [], []
        if row is None:
            window.append([])
            fill.append(0)
            row = len(window) - 1
        window[row].append(ex)
        fill[row] += n
    done.extend(window)
    rows = _empty_rows(len(done), seq_len, pad_id)
    for r, members in enumerate(done):
        start = 0
        for seg, ex in enumerate(members, start=1):
            _place(rows, r, start, seg, ex)
            start += len(ex["tokens"])
    return rows


def check_batch(batch: Mapping[str, np.ndarray], seq_len: int | None = None) -> None:
    """Raises ValueError unless `batch` follows the batch convention.

    Checks keys, dtypes, equal [B, T] shapes, segment ids that are contiguous runs
    numbered 1..k in order with padding (0) only after the last one, positions that count
    0, 1, ... within each segment, loss_mask 0 on padding and on every segment's first
    token.

    Args:
        batch: the batch.
        seq_len: expected T, if known.
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; a batch has {BATCH_KEYS}")
    shape = batch["tokens"].shape
    for k in BATCH_KEYS:
        a = batch[k]
        if a.dtype != BATCH_DTYPES[k]:
            raise ValueError(f"batch[{k!r}] has dtype {a.dtype}, expected "
                             f"{np.dtype(BATCH_DTYPES[k])}")
        if a.shape != shape or a.ndim != 2:
            raise ValueError(f"batch[{k!r}] has shape {a.shape}, expected 2-D {shape}")
    if seq_len is not None and shape[1] != seq_len:
        raise ValueError(f"batch rows have length {shape[1]}, expected {seq_len}")
    seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
    for b in range(shape[0]):
        s = seg[b]
        if np.any(np.diff(s[s > 0]) < 0) or np.any(np.diff(s[s > 0]) > 1) or (
                np.any(s > 0) and s[s > 0][0] != 1):
            raise ValueError(f"row {b}: segment ids {s.tolist()} are not 1, 2, ... in order")
        nz = np.nonzero(s)[0]
        if len(nz) and np.any(s[: nz[-1] + 1] == 0):
            raise ValueError(f"row {b}: padding (segment 0) before the last segment")
        starts = np.r_[True, s[1:] != s[:-1]]
        expected = np.zeros_like(pos[b])
        for t in range(1, shape[1]):
            expected[t] = 0 if starts[t] else expected[t - 1] + 1
        expected[s == 0] = 0
        if not np.array_equal(pos[b], expected):
            raise ValueError(f"row {b}: positions {pos[b].tolist()} do not restart at 0 per "
                             f"segment (expected {expected.tolist()})")
        if np.any(mask[b][s == 0] != 0) or np.any(mask[b][starts & (s > 0)] != 0):
            raise ValueError(f"row {b}: loss_mask is nonzero on padding or on a segment's "
                             "first token")


def unpack_batch(batch: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The examples held in a batch, row by row, segment by segment (for tests/debugging)."""
    out = []
    for b in range(batch["tokens"].shape[0]):
        s = batch["segment_ids"][b]
        for seg in range(1, int(s.max(initial=0)) + 1):
            idx = np.nonzero(s == seg)[0]
            out.append({"tokens": batch["tokens"][b, idx],
                        "loss_mask": batch["loss_mask"][b, idx]})
    return out


# --------------------------------------------------------------------------- grain stages


def pack_iter_dataset(ds, seq_len: int, *, num_bins: int, pad_id: int = 0):
    """A grain IterDataset of examples -> one of packed rows (not yet batched).

    Args:
        ds: `grain.IterDataset` of `{"tokens", "loss_mask"}` dicts (other keys ignored).
        seq_len: row length T.
        num_bins: rows open at a time (the batch size is a good value).
        pad_id: token id written into padding.

    Returns:
        `grain.IterDataset` of rows `{"tokens", "positions", "segment_ids", "loss_mask"}`
        of shape `[seq_len]`, in the order `pack_examples(..., num_bins=num_bins)` gives.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be positive, got {num_bins}")
    return _FirstFitPackIterDataset(ds, seq_len, num_bins, pad_id)


class _FirstFitPackIterDataset(grain.IterDataset):
    def __init__(self, parent, seq_len: int, num_bins: int, pad_id: int):
        super().__init__(parent)
        self._seq_len, self._num_bins, self._pad_id = seq_len, num_bins, pad_id

    def __iter__(self):
        return _FirstFitPackIterator(self._parent.__iter__(), self._seq_len, self._num_bins,
                                     self._pad_id)

    def __str__(self):
        return f"FirstFitPackIterDataset(seq_len={self._seq_len}, num_bins={self._num_bins})"


class _FirstFitPackIterator(grain.DatasetIterator):
    """Streaming `pack_examples`: fills a window of `num_bins` rows, then emits them.

    State: the parent's state where the current window began, and how many of its rows
    were emitted; restoring re-reads the window (packing is deterministic) and skips them.
    """

    def __init__(self, parent, seq_len: int, num_bins: int, pad_id: int):
        super().__init__(parent)
        self._seq_len, self._num_bins, self._pad_id = seq_len, num_bins, pad_id
        self._reset(self._parent.get_state(), skip=0)

    def _reset(self, window_start_state, skip: int):
        self._window_start = window_start_state  # parent state before the window's 1st read
        self._rows: list[dict[str, np.ndarray]] | None = None  # the finished window
        self._emitted = 0
        self._skip = skip  # rows to skip after rebuilding a restored window
        self._carry = None  # example read that opens the next window
        self._next_window_start = None

    def _build_window(self) -> None:
        members: list[list] = []
        fill: list[int] = []

        def place(ex) -> bool:
            n = len(ex["tokens"])
            if n > self._seq_len:
                raise ValueError(f"example of {n} tokens exceeds the row length "
                                 f"{self._seq_len}; truncate it first")
            if n == 0:
                return True  # nothing to place
            for r, f in enumerate(fill):
                if f + n <= self._seq_len:
                    members[r].append(ex)
                    fill[r] += n
                    return True
            if len(members) < self._num_bins:
                members.append([ex])
                fill.append(n)
                return True
            return False

        if self._carry is not None:
            place(self._carry)
            self._carry = None
        while True:
            before = self._parent.get_state()
            try:
                ex = next(self._parent)
            except StopIteration:
                self._next_window_start = self._parent.get_state()
                break
            if not place(ex):
                self._carry, self._next_window_start = ex, before
                break
        if not members:
            raise StopIteration
        rows = _empty_rows(len(members), self._seq_len, self._pad_id)
        for r, exs in enumerate(members):
            start = 0
            for seg, ex in enumerate(exs, start=1):
                _place(rows, r, start, seg, ex)
                start += len(ex["tokens"])
        self._rows = [{k: v[r] for k, v in rows.items()} for r in range(len(members))]
        self._emitted = 0

    def __next__(self):
        while self._rows is None or self._emitted >= len(self._rows):
            if self._rows is not None:  # window done: the next one starts at the carry
                self._window_start = self._next_window_start
            self._build_window()
            if self._skip:
                self._emitted, self._skip = min(self._skip, len(self._rows)), 0
        row = self._rows[self._emitted]
        self._emitted += 1
        return row

    def get_state(self):
        return {"parent": self._window_start, "emitted": self._emitted + self._skip}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._reset(state["parent"], skip=int(state["emitted"]))

    def __str__(self):
        return f"FirstFitPackIterator(seq_len={self._seq_len}, num_bins={self._num_bins})"


def pad_iter_dataset(ds, seq_len: int, *, pad_id: int = 0):
    """A grain IterDataset of examples -> one of padded rows (one example per row)."""
    return ds.map(_PadRow(seq_len, pad_id))


class _PadRow:
    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id

    def __call__(self, ex):
        return {k: v[0] for k, v in pad_examples([ex], self.seq_len, self.pad_id).items()}


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> Batch:
    """Stacks rows into a batch `[len(rows), T]` (grain `batch_fn`)."""
    return {k: np.stack([r[k] for r in rows]).astype(BATCH_DTYPES[k]) for k in BATCH_KEYS}
