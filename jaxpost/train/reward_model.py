"""Reward-model training: a Bradley–Terry scalar head on a (pretrained or SFT) transformer,
trained on preference pairs, evaluated by held-out pairwise accuracy.

Records: `{"prompt": ..., "chosen": ..., "rejected": ...}` (TRL's preference format).
`prompt` is a string or a list of chat messages (it may be left out: then `chosen` and
`rejected` are whole texts, or whole conversations whose earlier messages are the prompt);
`chosen` / `rejected` are strings or message lists ending with the assistant's response.
Each side becomes `encode(prompt_text + response) + EOS` (`jaxpost.rl.reward_model.
encode_sequence`), the same text a GRPO reward call scores.

Batches (numpy, this process's rows): `chosen_tokens`, `chosen_segment_ids`,
`rejected_tokens`, `rejected_segment_ids`, all int32 `[pairs, seq_len]`, right-padded.

    python -m jaxpost.train --config=configs/rm_demo.py --config.workdir=/tmp/rm_demo
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

from jaxpost import data
from jaxpost import sharding as sh
from jaxpost.data import synthetic
from jaxpost.models import ModelConfig
from jaxpost.optim import OptimizerConfig
from jaxpost.rl import reward_model as rm
from jaxpost.tokenizer import Tokenizer
from jaxpost.train.common import (
    MeshSection, ModelSection, model_init, restore_params, run_recipe, setup)
from jaxpost.train.loop import LoopConfig

log = logging.getLogger(__name__)

EVAL_METRICS = ("accuracy", "loss", "margin", "reward_chosen", "reward_rejected")


# ------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class PreferenceDataSection:
    """Where preference pairs come from and how they become batches."""

    source: str = "synthetic:addition"  # "a.jsonl,b*.jsonl", "*.array_record", "tfds:NAME" of {prompt, chosen, rejected} records, or "synthetic:addition[:D]" (correct vs wrong sums)
    split: str = "train"  # TFDS / synthetic split
    data_dir: str = ""  # TFDS data folder ("" = TFDS default)
    num_records: int = 20000  # synthetic sources: how many pairs
    tokenizer: str = "byte"  # "byte", an HF tokenizer folder, or a sentencepiece .model
    chat: bool = True  # render a plain-text prompt as one user turn of the chat template (message prompts always are)
    seq_len: int = 64  # tokens per sequence (prompt + response + EOS); chosen and rejected each get one row
    batch_size: int = 32  # preference pairs per optimizer step, summed over all processes
    truncation: Literal["truncate_left", "truncate_right", "drop"] = "truncate_left"  # a longer sequence: keep its end (where the score is read), its start, or drop the pair
    skip_malformed: bool = False  # JSONL: skip and count lines that are not JSON instead of failing
    shuffle: bool = True  # reshuffle every epoch (deterministic by seed)

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class PreferenceEvalSection:
    """Held-out pairwise accuracy (every `eval_every` steps)."""

    source: str = ""  # held-out pairs: a file spec, or "" for the synthetic source's "heldout" split / `holdout_fraction` of a file source
    split: str = "heldout"  # TFDS / synthetic split of eval.source
    holdout_fraction: float = 0.0  # file sources with no eval.source: this fraction of the records (a fixed, seed-independent choice) is held out of training
    num_pairs: int = 500  # at most this many held-out pairs per evaluation
    batch_size: int = 64  # pairs per scoring call, over all processes

    def __post_init__(self):
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"eval.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.num_pairs < 1 or self.batch_size < 1:
            raise ValueError("eval.num_pairs and eval.batch_size must be >= 1")


@dataclasses.dataclass(frozen=True)
class RewardHeadSection:
    """The score head and extra loss terms."""

    head_init_std: float = 0.0  # std of the head kernel's normal init (0: zeros, every score 0 at start)
    center_rewards_coefficient: float = 0.0  # + c * (r_chosen + r_rejected)^2 per pair, keeps scores near 0 (TRL; Eisenstein et al. 2023)


@dataclasses.dataclass(frozen=True)
class RewardModelConfig(LoopConfig):
    """Bradley–Terry reward model on preference pairs (InstructGPT's RM stage)."""

    trainer: str = "reward_model"  # which trainer runs this config
    model: ModelSection = ModelSection()  # the backbone: hf_path / init_from (an SFT or reward-model workdir) / preset / shape
    data: PreferenceDataSection = PreferenceDataSection()
    head: RewardHeadSection = RewardHeadSection()
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-5)
    mesh: MeshSection = MeshSection()
    eval: PreferenceEvalSection = PreferenceEvalSection()


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
    return tuple(rm.encode_sequence(tokenizer, *_side_texts(tokenizer, record, f, chat))
                 for f in ("chosen", "rejected"))


def open_preference_source(spec: str, *, split: str = "train", data_dir: str | None = None,
                           num_records: int = 20000, seed: int = 0,
                           skip_malformed: bool = False) -> Any:
    """A source of preference records; `"synthetic:addition[:D]"` gives
    `synthetic.addition_preference_records`, anything else goes to `data.open_source`."""
    if spec.startswith("synthetic:"):
        records = synthetic.addition_preference_records(
            num_records, seed=seed, split=split, max_digits=synthetic.parse_spec(spec))
        return data.InMemorySource(records, schema=None)
    return data.open_source(spec, split=split, data_dir=data_dir, schema=None,
                            skip_malformed=skip_malformed)


def check_preference_source(source: Any, name: str) -> None:
    """Checks every record; raises `MalformedRecordError` naming the first bad one's
    file and line (or index) and the field."""
    locate = getattr(source, "location", None)
    for i in range(len(source)):
        problem = preference_problem(source[i])
        if problem:
            where = "%s:%d" % locate(i) if locate else f"{name} record {i}"
            raise data.MalformedRecordError(f"{where}: {problem}")


# ------------------------------------------------------------------------------ batches
class PreferenceBatches:
    """Batches of preference pairs from a list of record indices, with resumable state.

    This process reads every `process_count`-th index; each epoch visits them in a
    permutation seeded by `(seed, epoch)`. The state is `{epoch, position}` plus the
    truncated / dropped counts.
    """

    STATE_FORMAT = "jaxpost.reward_model.preference_batches/1"

    def __init__(self, source: Any, indices: Sequence[int], tokenizer: Tokenizer, *,
                 batch_size: int, seq_len: int, truncation: str = "truncate_left",
                 chat: bool = True, seed: int = 0, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1):
        self.indices = np.asarray(indices, np.int64)[process_index::process_count]
        if not len(self.indices):
            raise ValueError("no preference records left for training (after hold-out, on "
                             f"process {process_index} of {process_count})")
        self.source, self.tokenizer = source, tokenizer
        self.batch_size, self.seq_len, self.truncation = batch_size, seq_len, truncation
        self.chat, self.seed, self.shuffle = chat, seed, shuffle
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
        chosen, rejected = [], []
        skipped = 0
        while len(chosen) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            index = int(self._order[self.position])
            self.position += 1
            c, r = encode_pair(self.tokenizer, self.source[index], chat=self.chat)
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
        return pair_batch(chosen, rejected, self.seq_len, self.tokenizer.pad_id, self.truncation)

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
               pad_id: int, truncation: str = "truncate_left") -> dict[str, np.ndarray]:
    """The batch dict of paired id lists (right-padded to `seq_len`)."""
    mode = "truncate_right" if truncation == "truncate_right" else "truncate_left"
    ct, cs, _ = rm.pad_sequences(chosen, seq_len, pad_id, mode)
    rt, rs, _ = rm.pad_sequences(rejected, seq_len, pad_id, mode)
    return {"chosen_tokens": ct, "chosen_segment_ids": cs,
            "rejected_tokens": rt, "rejected_segment_ids": rs}


# --------------------------------------------------------------------------------- eval
class PairwiseEval:
    """Pairwise accuracy, loss, margin and mean scores on fixed held-out pairs."""

    def __init__(self, pairs: Sequence[tuple[list[int], list[int]]], loss_fn, mesh,
                 param_shardings, *, seq_len: int, batch_size: int, pad_id: int,
                 truncation: str = "truncate_left", rules=sh.DEFAULT_RULES):
        procs = jax.process_count()
        self.batch_size = -(-batch_size // procs) * procs  # a multiple of the processes
        self.pairs, self.mesh, self.rules = list(pairs), mesh, rules
        self.seq_len, self.pad_id, self.truncation = seq_len, pad_id, truncation

        def fn(params, batch):
            with sh.logical_rules(mesh, rules):
                return loss_fn(params, batch, None)

        self._fn = jax.jit(fn, in_shardings=(param_shardings, None))

    def __call__(self, params) -> dict[str, float]:
        if not self.pairs:
            return {}
        b, procs, pid = self.batch_size, jax.process_count(), jax.process_index()
        local = b // procs
        sums = {k: 0.0 for k in EVAL_METRICS}
        total = 0.0
        for start in range(0, len(self.pairs), b):
            chunk = self.pairs[start:start + b]
            weight = np.zeros((b,), np.float32)
            weight[:len(chunk)] = 1.0
            chunk = chunk + [([], [])] * (b - len(chunk))
            rows = slice(pid * local, (pid + 1) * local)
            batch = pair_batch([c for c, _ in chunk[rows]], [r for _, r in chunk[rows]],
                               self.seq_len, self.pad_id, self.truncation)
            batch["pair_weight"] = weight[rows]
            loss_sum, count, aux = jax.device_get(
                self._fn(params, sh.shard_batch(batch, self.mesh, self.rules)))
            sums["loss"] += float(loss_sum)
            total += float(count)
            for k in EVAL_METRICS[:1] + EVAL_METRICS[2:]:
                sums[k] += float(aux[k][0])
        return {k: v / max(total, 1.0) for k, v in sums.items()}


# --------------------------------------------------------------------------------- task
class RewardModelTask:
    """Preference batches, the Bradley–Terry loss, held-out pairwise accuracy."""

    def __init__(self, cfg: RewardModelConfig, model_cfg: ModelConfig, tokenizer: Tokenizer,
                 mesh, param_shardings):
        d, e = cfg.data, cfg.eval
        procs = jax.process_count()
        if d.batch_size % procs:
            raise ValueError(f"data.batch_size={d.batch_size} is not divisible by the "
                             f"{procs} processes")
        source = open_preference_source(d.source, split=d.split, data_dir=d.data_dir or None,
                                        num_records=d.num_records, seed=cfg.seed,
                                        skip_malformed=d.skip_malformed)
        check_preference_source(source, d.source)
        indices = np.arange(len(source))
        heldout_source, heldout_idx = None, None
        if e.source:
            heldout_source = open_preference_source(e.source, split=e.split,
                                                    data_dir=d.data_dir or None,
                                                    num_records=e.num_pairs, seed=cfg.seed)
            check_preference_source(heldout_source, e.source)
            heldout_idx = np.arange(len(heldout_source))
        elif d.source.startswith("synthetic:"):
            heldout_source = open_preference_source(d.source, split="heldout",
                                                    num_records=e.num_pairs, seed=cfg.seed)
            heldout_idx = np.arange(len(heldout_source))
        elif e.holdout_fraction > 0:
            order = np.random.default_rng(0x5EED).permutation(len(source))
            k = max(1, int(round(e.holdout_fraction * len(source))))
            heldout_source, heldout_idx, indices = source, np.sort(order[:k]), np.sort(order[k:])
        self.iterator = PreferenceBatches(
            source, indices, tokenizer, batch_size=d.batch_size // procs, seq_len=d.seq_len,
            truncation=d.truncation, chat=d.chat, seed=cfg.seed, shuffle=d.shuffle,
            process_index=jax.process_index(), process_count=procs)
        self.loss_fn = rm.make_reward_model_loss(model_cfg, cfg.head.center_rewards_coefficient)
        self._heldout = (heldout_source, heldout_idx)
        self._eval_args = dict(mesh=mesh, param_shardings=param_shardings)
        self._evaluator: PairwiseEval | None = None
        self.cfg, self.tokenizer = cfg, tokenizer

    def next_batch(self, state) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        del state
        batch = next(self.iterator)
        return batch, {"data_truncated": float(self.iterator.truncated),
                       "data_dropped": float(self.iterator.dropped),
                       "epoch": float(self.iterator.epoch)}

    def data_state(self) -> dict:
        return self.iterator.get_state()

    def set_data_state(self, state: dict) -> None:
        self.iterator.set_state(state)

    def _make_evaluator(self) -> PairwiseEval:
        d, e = self.cfg.data, self.cfg.eval
        source, idx = self._heldout
        pairs = []
        for i in idx[:e.num_pairs] if idx is not None else []:
            c, r = encode_pair(self.tokenizer, source[int(i)], chat=d.chat)
            if d.truncation == "drop" and max(len(c), len(r)) > d.seq_len:
                continue
            pairs.append((c, r))
        return PairwiseEval(pairs, self.loss_fn, seq_len=d.seq_len, batch_size=e.batch_size,
                            pad_id=self.tokenizer.pad_id, truncation=d.truncation,
                            **self._eval_args)

    def evaluate(self, params, step: int) -> dict[str, float]:
        del step
        if self._evaluator is None:
            self._evaluator = self._make_evaluator()
        return self._evaluator(params)


# -------------------------------------------------------------------------------- train
def _is_reward_model_workdir(workdir: str) -> bool:
    from jaxpost.checkpoint import Checkpointer

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return False  # model_init reports the missing checkpoint
    with Checkpointer(directory, async_save=False) as ckpt:
        return ckpt.latest_step() is not None and "reward_model" in ckpt.metadata()


def train(cfg: RewardModelConfig):
    """Runs (or resumes) a reward-model recipe; returns the loop's result."""
    tokenizer, mesh, model_cfg = setup(cfg.model, cfg.mesh, cfg.data.tokenizer)
    backbone_init, _, _ = model_init(cfg.model, model_cfg, mesh, cfg.seed)
    abstract = rm.rm_param_shapes(model_cfg)
    shardings = rm.rm_param_shardings(model_cfg, mesh)

    def init():
        if cfg.model.init_from and _is_reward_model_workdir(cfg.model.init_from):
            return restore_params(cfg.model.init_from, abstract, shardings)  # head included
        head_rng = jax.random.fold_in(jax.random.key(cfg.seed), 1)
        head = jax.jit(lambda: rm.init_head(model_cfg, head_rng, cfg.head.head_init_std),
                       out_shardings=shardings[rm.HEAD])()
        return {rm.BACKBONE: backbone_init(), rm.HEAD: head}

    task = RewardModelTask(cfg, model_cfg, tokenizer, mesh, shardings)
    return run_recipe(cfg, task, model_cfg, mesh, init, abstract, shardings,
                      reward_model={"backbone": rm.BACKBONE, "head": rm.HEAD,
                                    "pooling": "last_token"})


__all__ = ["PairwiseEval", "PreferenceBatches", "PreferenceDataSection",
           "PreferenceEvalSection", "RewardHeadSection", "RewardModelConfig", "RewardModelTask",
           "check_preference_source", "encode_pair", "open_preference_source", "pair_batch",
           "preference_problem", "train"]
