"""The SFT objective: next-token cross-entropy on the tokens the loss mask marks.

Batch convention (shared with `jaxpost.data`): `tokens`, `positions`, `segment_ids`,
`loss_mask`, all [B, T]; `loss_mask[b, t] = 1` when `tokens[b, t]` is a target predicted
from position t-1 of the same segment.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxpost import data
from jaxpost import sharding as sh
from jaxpost.distributed import initialize
from jaxpost.models import ModelConfig, Transformer, param_logical_axes, token_logprobs
from jaxpost.models.layers import dropout_rngs
from jaxpost.peft.alignguard import AlignGuardConfig
from jaxpost.train.common import (
    EvalSection, GenerationEval, RecipeConfig, model_init, plan_params, run_recipe, setup,
    sft_warmup)
from jaxpost.train.regularise import (
    FisherSection, RegulariseSection, check_config, regularisers_for)

log = logging.getLogger(__name__)


def make_sft_loss(cfg: ModelConfig):
    """`loss_fn(params, batch, rng) -> (nll_sum, target_count, aux)` for `train_step`."""
    model = Transformer(cfg)

    def loss_fn(params, batch, rng):
        tokens = batch["tokens"]
        logits = model.apply({"params": params}, tokens, positions=batch.get("positions"),
                             segment_ids=batch.get("segment_ids"), rngs=dropout_rngs(cfg, rng))
        # Position t predicts tokens[t + 1]; the last position gets a dummy target and a 0
        # weight. Slicing logits[:, :-1] instead would copy the [B, T, V] logits (and pad
        # their gradient back), the largest tensor of the step.
        targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
        logp, correct = token_logprobs(logits, targets, with_hits=True)
        weights = batch["loss_mask"].astype(jnp.float32)
        mask = jnp.concatenate([weights[:, 1:], jnp.zeros_like(weights[:, :1])], axis=1)
        count = jnp.sum(mask)
        aux = {"token_accuracy": (jnp.sum(correct * mask), count)}
        return -jnp.sum(logp * mask), count, aux

    return loss_fn


# ----------------------------------------------------------------------------- recipe
@dataclasses.dataclass(frozen=True)
class DataSection:
    """Where SFT examples come from and how they become batches."""

    source: str = "synthetic:addition"  # "a.jsonl,b*.jsonl", "*.array_record", "tfds:NAME", "synthetic:addition"
    split: str = "train"  # TFDS / synthetic split
    data_dir: str = ""  # TFDS data folder ("" = TFDS default)
    num_records: int = 20000  # synthetic sources: how many records
    tokenizer: str = "byte"  # "byte", an HF tokenizer folder, or a sentencepiece .model
    seq_len: int = 64  # tokens per row
    batch_size: int = 32  # rows per optimizer step, summed over all processes
    pack: bool = True  # first-fit packing with segment ids (False: one example per row)
    truncation: str = "truncate_right"  # "truncate_right", "truncate_left" or "drop"
    skip_malformed: bool = False  # JSONL: skip and count malformed lines instead of failing
    shuffle: bool = True  # reshuffle every epoch (deterministic by seed)
    eval_source: str = ""  # held-out examples for eval loss ("" = synthetic sources' held-out split, else none)
    eval_split: str = "heldout"  # split of eval_source (TFDS: e.g. "test")
    eval_batches: int = 4  # batches of held-out examples per eval-loss measurement


@dataclasses.dataclass(frozen=True)
class SFTConfig(RecipeConfig):
    """Supervised fine-tuning: next-token loss on completion / assistant tokens."""

    trainer: str = "sft"  # which trainer runs this config
    data: DataSection = DataSection()
    eval: EvalSection = EvalSection()
    init_sft_config: str = ""  # a recipe file ("configs/x.py", or "configs/x.py:ARG" for get_config(ARG)): train it into WORKDIR/sft_init first when model.init_from is unset (a warm-up stage)
    init_sft_steps: int = 0  # steps of that SFT warm-up (0: its own `steps`)
    regularise: RegulariseSection = RegulariseSection()  # L2-to-start / EWC (jaxpost.train.regularise)
    alignguard: AlignGuardConfig = AlignGuardConfig()  # AlignGuard-LoRA (jaxpost.peft.alignguard); enabled=False: off
    fisher: FisherSection = FisherSection()  # the alignment-set Fisher that alignguard and regularise.ewc read

    identity_keys: ClassVar[tuple[str, ...]] = RecipeConfig.identity_keys + (
        "alignguard.enabled", "alignguard.split", "fisher.source", "fisher.kind")

    def __post_init__(self):
        super().__post_init__()
        check_config(self)  # alignguard/regularise/fisher: errors, and warnings of zero terms


class SFTTask:
    """Batches from the grain pipeline, loss from `make_sft_loss`, eval by generation."""

    def __init__(self, cfg: SFTConfig, model_cfg: ModelConfig, tokenizer, mesh):
        d = cfg.data
        procs = jax.process_count()
        if d.batch_size % procs:
            raise ValueError(f"data.batch_size={d.batch_size} is not divisible by the "
                             f"{procs} processes")
        source = data.open_source(d.source, split=d.split, data_dir=d.data_dir or None,
                                  skip_malformed=d.skip_malformed, num_records=d.num_records,
                                  seed=cfg.seed,
                                  skip_hint="pass --config.data.skip_malformed=True")
        self.iterator = data.make_sft_iterator(
            source, tokenizer, seq_len=d.seq_len, batch_size=d.batch_size // procs,
            pack=d.pack, seed=cfg.seed, shuffle=d.shuffle, truncation=d.truncation)
        self.loss_fn = make_sft_loss(model_cfg)
        self.cfg, self.tokenizer = cfg, tokenizer
        self._evaluator = GenerationEval(cfg.eval, model_cfg, tokenizer, mesh, cfg.seed,
                                         workdir=cfg.workdir)
        self._mesh = mesh
        self._eval_batches = self._heldout_batches(tokenizer)

        def eval_loss(params, batch):
            with sh.logical_rules(mesh):
                return self.loss_fn(params, batch, None)[:2]
        self._eval_loss = jax.jit(eval_loss)

    def _heldout_batches(self, tokenizer) -> list[dict]:
        d = self.cfg.data
        spec = d.eval_source or (d.source if d.source.startswith("synthetic:") else "")
        if not spec or d.eval_batches <= 0:
            return []
        source = data.open_source(spec, split=d.eval_split, data_dir=d.data_dir or None,
                                  num_records=d.eval_batches * d.batch_size * 4, seed=self.cfg.seed)
        it = data.make_sft_iterator(
            source, tokenizer, seq_len=d.seq_len, batch_size=d.batch_size // jax.process_count(),
            pack=d.pack, seed=self.cfg.seed, shuffle=False, num_epochs=1,
            truncation=d.truncation, num_threads=0)
        return [b for _, b in zip(range(d.eval_batches), it)]

    def next_batch(self, state):
        del state
        batch = next(self.iterator)
        stats = self.iterator.stats
        return batch, {"data_truncated": float(stats.truncated),
                       "data_dropped": float(stats.dropped_too_long + stats.dropped_no_targets)}

    def data_state(self) -> dict:
        return self.iterator.get_state()

    def set_data_state(self, state: dict) -> None:
        self.iterator.set_state(state)

    def evaluate(self, params, step: int) -> dict[str, float]:
        """Held-out loss (token-weighted) and the generation eval of `cfg.eval`."""
        out = dict(self._evaluator(params, step))
        if self._eval_batches:
            total = count = 0.0
            for batch in self._eval_batches:
                s, c = self._eval_loss(params, sh.shard_batch(batch, self._mesh))
                total, count = total + float(s), count + float(c)
            out["loss"] = total / max(count, 1.0)
        return out


def train(cfg: SFTConfig):
    """Runs (or resumes) an SFT recipe; returns the loop's result.

    With `init_sft_config`, that SFT warm-up runs (or resumes, or finds itself done)
    first and this run starts from its params; if SIGTERM stops the warm-up, its result
    (`preempted`) is returned and this stage does not start.
    """
    initialize(cfg.distributed)  # before the SFT warm-up touches a device
    model_section, warmup = sft_warmup(cfg)
    if warmup is not None and warmup.preempted:
        log.warning("preempted during the SFT warm-up: %s saved at step %d; run again "
                    "with the same workdir to finish it", model_section.init_from,
                    int(warmup.state.step))
        return warmup
    tokenizer, mesh, model_cfg = setup(model_section, cfg.mesh, cfg.data.tokenizer, cfg.distributed)
    plan = plan_params(cfg, model_cfg, *model_init(model_section, model_cfg, mesh, cfg.seed),
                       param_logical_axes(model_cfg), mesh)
    task = SFTTask(cfg, plan.model_cfg, tokenizer, mesh)
    # The Fisher step (estimated once, cached in fisher.path / WORKDIR/fisher) and the
    # regularisers the train step adds once per optimizer step.
    task.regularisers = regularisers_for(cfg, plan, model_cfg, tokenizer)
    return run_recipe(cfg, task, plan, mesh)
