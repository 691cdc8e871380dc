"""Preference pairs for reward models: records, their token ids, and batches.

Records: `{"prompt": ..., "chosen": ..., "rejected": ...}` (TRL's preference format).
`prompt` is a string or a list of chat messages (it may be left out: then `chosen` and
`rejected` are whole texts, or whole conversations whose earlier messages are the prompt);
`chosen` / `rejected` are strings or message lists ending with the assistant's response.
Each side becomes `encode(prompt_text + response) + EOS` (`encode_sequence`), the same
text a reward model scores when it rates GRPO completions
(`jaxpost.rl.reward_model.RewardModelReward`).

Batches (numpy, this process's rows): `chosen_tokens`, `chosen_segment_ids`,
`rejected_tokens`, `rejected_segment_ids`, all int32 `[pairs, seq_len]`, right-padded
(`pair_batch`); `PreferenceBatches` streams them with a resumable state.

Gaze features (GazeReward, `jaxpost.rl.gaze_reward`): given a `featurize(text) ->
float [len(tokenizer.encode(text)), k]` (a `GazeFeaturizer`), each side also gets
per-token features aligned with its ids (`encode_sequence_features`; BOS/EOS rows 0),
padded and truncated like the tokens (`pad_features`), as `chosen_gaze` /
`rejected_gaze` float32 `[pairs, seq_len, k]`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxpost.data import synthetic
from jaxpost.data.sources import InMemorySource, MalformedRecordError, open_source
from jaxpost.tokenizer import Tokenizer

TRUNCATIONS = ("truncate_left", "truncate_right")  # what `pad_sequences` accepts
Featurize = Callable[[str], np.ndarray]  # text -> float [len(tokenizer.encode(text)), k]


# --------------------------------------------------------------------------------- text
def encode_sequence(tokenizer: Tokenizer, prompt: str, completion: str, *,
                    add_eos: bool = True) -> list[int]:
    """Ids of `prompt + completion` as the reward model sees them.

    BOS is prepended when the tokenizer adds one by default and the text does not start
    with it (chat templates write their own); EOS is appended when `add_eos` and the text
    does not already end with it.
    """
    ids = tokenizer.encode(prompt + completion)
    front, back = _framing(tokenizer, ids, add_eos)
    return front + ids + back


def _framing(tokenizer: Tokenizer, ids: list[int], add_eos: bool) -> tuple[list[int], list[int]]:
    """The BOS / EOS ids `encode_sequence` puts around the text's ids."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    front = [bos] if tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos) else []
    full = front + ids
    back = [eos] if add_eos and eos is not None and (not full or full[-1] != eos) else []
    return front, back


def encode_sequence_features(tokenizer: Tokenizer, prompt: str, completion: str,
                             featurize: Featurize, *, add_eos: bool = True
                             ) -> tuple[list[int], np.ndarray]:
    """`(encode_sequence(...), float32 [len(ids), k])`: the ids and per-token features of
    `prompt + completion` (rows of an added BOS / EOS are 0)."""
    text = prompt + completion
    ids = tokenizer.encode(text)
    feats = np.asarray(featurize(text), np.float32)
    if feats.ndim != 2 or len(feats) != len(ids):
        raise ValueError(f"featurize({text[:40]!r}...) returned shape {feats.shape}; "
                         f"expected ({len(ids)} tokens, k)")
    front, back = _framing(tokenizer, ids, add_eos)
    k = feats.shape[1]
    feats = np.concatenate([np.zeros((len(front), k), np.float32), feats,
                            np.zeros((len(back), k), np.float32)])
    return front + ids + back, feats


def pad_features(features: Sequence[np.ndarray], seq_len: int, num_features: int,
                 truncation: str = "truncate_left") -> np.ndarray:
    """Per-sequence features [n_i, k] -> float32 [N, seq_len, k], laid out as
    `pad_sequences` lays out the tokens (0 on padding; a longer sequence keeps its last
    or first `seq_len` rows)."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r}; expected one of {TRUNCATIONS}")
    out = np.zeros((len(features), seq_len, num_features), np.float32)
    for i, f in enumerate(features):
        f = np.asarray(f, np.float32).reshape(-1, num_features)
        if len(f) > seq_len:
            f = f[-seq_len:] if truncation == "truncate_left" else f[:seq_len]
        out[i, :len(f)] = f
    return out


def pad_sequences(seqs: Sequence[Sequence[int]], seq_len: int, pad_id: int,
                  truncation: str = "truncate_left") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded rows of one sequence each.

    Args:
        seqs: token id lists.
        seq_len: row width.
        pad_id: id written into padding.
        truncation: a longer sequence keeps its last `seq_len` tokens ("truncate_left",
            so the response and its EOS, which the score reads, survive) or its first
            ("truncate_right").

    Returns:
        `(tokens int32 [N, seq_len], segment_ids int32 [N, seq_len], truncated bool [N])`;
        segment ids are 1 on tokens, 0 on padding.
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r}; expected one of {TRUNCATIONS}")
    n = len(seqs)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    seg = np.zeros((n, seq_len), np.int32)
    truncated = np.zeros((n,), bool)
    for i, ids in enumerate(seqs):
        if len(ids) > seq_len:
            truncated[i] = True
            ids = ids[-seq_len:] if truncation == "truncate_left" else ids[:seq_len]
        tokens[i, :len(ids)] = ids
        seg[i, :len(ids)] = 1
    return tokens, seg, truncated


# ------------------------------------------------------------------------------ records
def _messages_problem(value: Any, field: str) -> str | None:
    if not value:
        return f"'{field}' is an empty list; expected at least one message"
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            return f"'{field}[{i}]' must be {{'role': str, 'content': str}}, got {m!r:.80}"
    return None


def preference_problem(record: Any) -> str | None:
    """What is wrong with a preference record, or None if it is valid."""
    if not isinstance(record, Mapping):
        return (f"record is a {type(record).__name__}, expected an object with 'prompt', "
                "'chosen' and 'rejected'")
    for field in ("chosen", "rejected"):
        if field not in record:
            return (f"record has keys {sorted(record)}; missing '{field}' (a preference "
                    "record needs 'chosen' and 'rejected', and usually 'prompt')")
        value = record[field]
        if isinstance(value, list):
            problem = _messages_problem(value, field)
            if problem:
                return problem
            if value[-1]["role"] != "assistant":
                return (f"'{field}' ends with a {value[-1]['role']!r} message; its last message "
                        "must be the assistant's response")
        elif not isinstance(value, str):
            return (f"'{field}' is {type(value).__name__}, expected a string or a list of "
                    "messages")
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        problem = _messages_problem(prompt, "prompt") if isinstance(prompt, list) else (
            f"'prompt' is {type(prompt).__name__}, expected a string or a list of messages")
        if problem:
            return problem
    return None


def _side_texts(tokenizer: Tokenizer, record: Mapping[str, Any], field: str,
                chat: bool) -> tuple[str, str]:
    """(prompt text, response text) of one side of a preference record."""
    value, prompt = record[field], record.get("prompt")
    prefix, response = ([], value) if isinstance(value, str) else (value[:-1], value[-1]["content"])
    if prompt is None or prompt == "":
        messages = list(prefix)
    elif isinstance(prompt, list):
        messages = list(prompt) + list(prefix)
    elif chat or prefix:
        messages = [{"role": "user", "content": prompt}] + list(prefix)
    else:
        return prompt, response
    if not messages:
        return "", response
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True), response


def encode_pair(tokenizer: Tokenizer, record: Mapping[str, Any], *,
                chat: bool = True) -> tuple[list[int], list[int]]:
    """(chosen ids, rejected ids) of a valid preference record, EOS-terminated."""
    return tuple(encode_sequence(tokenizer, *_side_texts(tokenizer, record, f, chat))
                 for f in ("chosen", "rejected"))


def encode_pair_features(tokenizer: Tokenizer, record: Mapping[str, Any], featurize: Featurize,
                         *, chat: bool = True) -> tuple[tuple[list[int], np.ndarray], ...]:
    """`((chosen ids, chosen features), (rejected ids, rejected features))` of a valid
    record: `encode_pair`'s ids with their per-token features [len(ids), k]."""
    return tuple(encode_sequence_features(tokenizer, *_side_texts(tokenizer, record, f, chat),
                                          featurize)
                 for f in ("chosen", "rejected"))


def open_preference_source(spec: str, *, split: str = "train", data_dir: str | None = None,
                           num_records: int = 20000, seed: int = 0,
                           skip_malformed: bool = False,
                           skip_hint: str = "open the source with skip_malformed=True") -> Any:
    """A source of preference records; `"synthetic:addition[:D]"` gives
    `synthetic.addition_preference_records`, `"synthetic:alignment[:CAT+CAT]"`
    `alignment.refusal_preference_records` (a refusal detector: the drift eval's
    reward-model judge), anything else goes to `open_source`."""
    if spec.startswith("synthetic:alignment"):
        from jaxpost.data import alignment

        records = alignment.refusal_preference_records(
            num_records, seed=seed, split=split, categories=alignment.parse_spec(spec))
        return InMemorySource(records, schema=None)
    if spec.startswith("synthetic:"):
        records = synthetic.addition_preference_records(
            num_records, seed=seed, split=split, max_digits=synthetic.parse_spec(spec))
        return InMemorySource(records, schema=None)
    return open_source(spec, split=split, data_dir=data_dir, schema=None,
                       skip_malformed=skip_malformed, skip_hint=skip_hint)


def check_preference_source(source: Any, name: str) -> None:
    """Checks every record; raises `MalformedRecordError` naming the first bad one's
    file and line (or index) and the field."""
    locate = getattr(source, "location", None)
    for i in range(len(source)):
        problem = preference_problem(source[i])
        if problem:
            where = "%s:%d" % locate(i) if locate else f"{name} record {i}"
            raise MalformedRecordError(f"{where}: {problem}")


# ------------------------------------------------------------------------------ batches
class PreferenceBatches:
    """Batches of preference pairs from a list of record indices, with resumable state.

    This process reads every `process_count`-th index; each epoch visits them in a
    permutation seeded by `(seed, epoch)`. The state is `{epoch, position}` plus the
    truncated / dropped counts. With `featurize` (a gaze model) the batches also hold
    `chosen_gaze` / `rejected_gaze` (see the module docstring).
    """

    STATE_FORMAT = "jaxpost.reward_model.preference_batches/1"

    def __init__(self, source: Any, indices: Sequence[int], tokenizer: Tokenizer, *,
                 batch_size: int, seq_len: int, truncation: str = "truncate_left",
                 chat: bool = True, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1,
                 featurize: Featurize | None = None):
        self.indices = np.asarray(indices, np.int64)[process_index::process_count]
        if not len(self.indices):
            raise ValueError("no preference records left for training (after hold-out, on "
                             f"process {process_index} of {process_count})")
        self.source, self.tokenizer = source, tokenizer
        self.batch_size, self.seq_len, self.truncation = batch_size, seq_len, truncation
        self.chat, self.seed, self.shuffle, self.featurize = chat, seed, shuffle, featurize
        self.epoch = self.position = self.truncated = self.dropped = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
        return self.indices[order]

    def __iter__(self) -> PreferenceBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        chosen, rejected, chosen_gaze, rejected_gaze = [], [], [], []
        skipped = 0
        while len(chosen) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            index = int(self._order[self.position])
            self.position += 1
            if self.featurize is None:
                c, r = encode_pair(self.tokenizer, self.source[index], chat=self.chat)
            else:
                (c, cg), (r, rg) = encode_pair_features(self.tokenizer, self.source[index],
                                                        self.featurize, chat=self.chat)
            if max(len(c), len(r)) > self.seq_len:
                if self.truncation == "drop":
                    self.dropped += 1
                    skipped += 1
                    if skipped > len(self.indices):
                        raise ValueError(f"every preference pair is longer than data.seq_len="
                                         f"{self.seq_len} tokens and data.truncation='drop'")
                    continue
                self.truncated += 1
            chosen.append(c)
            rejected.append(r)
            if self.featurize is not None:
                chosen_gaze.append(cg)
                rejected_gaze.append(rg)
        return pair_batch(chosen, rejected, self.seq_len, self.tokenizer.pad_id, self.truncation,
                          chosen_gaze=chosen_gaze or None, rejected_gaze=rejected_gaze or None)

    def get_state(self) -> dict[str, Any]:
        return {"format": self.STATE_FORMAT, "epoch": self.epoch, "position": self.position,
                "truncated": self.truncated, "dropped": self.dropped}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != self.STATE_FORMAT:
            raise ValueError(f"not a preference-batch state (format {state.get('format')!r})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.truncated, self.dropped = int(state["truncated"]), int(state["dropped"])
        self._order = self._epoch_order(self.epoch)


def pair_batch(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], seq_len: int,
               pad_id: int, truncation: str = "truncate_left", *,
               chosen_gaze: Sequence[np.ndarray] | None = None,
               rejected_gaze: Sequence[np.ndarray] | None = None,
               num_features: int | None = None) -> dict[str, np.ndarray]:
    """The batch dict of paired id lists (right-padded to `seq_len`), plus
    `chosen_gaze` / `rejected_gaze` when per-token features are given (`num_features`:
    k, default the first feature array's; needed when every feature list is empty)."""
    mode = "truncate_right" if truncation == "truncate_right" else "truncate_left"
    ct, cs, _ = pad_sequences(chosen, seq_len, pad_id, mode)
    rt, rs, _ = pad_sequences(rejected, seq_len, pad_id, mode)
    batch = {"chosen_tokens": ct, "chosen_segment_ids": cs,
             "rejected_tokens": rt, "rejected_segment_ids": rs}
    if chosen_gaze is not None or rejected_gaze is not None:
        if chosen_gaze is None or rejected_gaze is None:
            raise ValueError("pair_batch: give gaze features for both chosen and rejected")
        if len(chosen_gaze) != len(chosen) or len(rejected_gaze) != len(rejected):
            raise ValueError(f"pair_batch: {len(chosen_gaze)}/{len(rejected_gaze)} gaze "
                             f"feature arrays for {len(chosen)}/{len(rejected)} sequences")
        if num_features is None:
            num_features = int(np.shape(chosen_gaze[0])[-1])
        batch["chosen_gaze"] = pad_features(chosen_gaze, seq_len, num_features, mode)
        batch["rejected_gaze"] = pad_features(rejected_gaze, seq_len, num_features, mode)
    return batch


__all__ = ["Featurize", "PreferenceBatches", "TRUNCATIONS", "check_preference_source",
           "encode_pair", "encode_pair_features", "encode_sequence", "encode_sequence_features",
           "open_preference_source", "pad_features", "pad_sequences", "pair_batch",
           "preference_problem"]
