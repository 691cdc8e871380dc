"""Reward-model training: a Bradley–Terry scalar head on a (pretrained or SFT) transformer,
trained on preference pairs, evaluated by held-out pairwise accuracy.

Records (TRL's `{"prompt", "chosen", "rejected"}` preference format), their encoding and
the batches are `jaxpost.data.preference`; the head and the loss are
`jaxpost.rl.reward_model`. This module is the recipe: config, task, held-out eval.

GazeReward (the `gaze` section, mode "add" or "concat"; `jaxpost.rl.gaze_reward`): the
batches also carry per-token gaze features from `gaze.predictor`, the params a `"gaze"`
entry (projector, and the `<eye/>`/`</eye>` rows for concat) that trains with the head;
mode "off" (the default) is the plain reward model, the ablation.

    python -m jaxpost.train --config=configs/rm_demo.py --config.workdir=/tmp/rm_demo
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import ClassVar, Literal

import jax
import numpy as np

from jaxpost import sharding as sh
from jaxpost.checkpoint import latest_run_step, open_run, run_metadata
from jaxpost.data.preference import (
    PreferenceBatches,
    check_preference_source,
    encode_pair,
    encode_pair_features,
    open_preference_source,
    pair_batch,
    preference_problem,
)
from jaxpost.models import ModelConfig
from jaxpost.optim import OptimizerConfig
from jaxpost.peft.freeze import Rules
from jaxpost.rl import gaze_reward as gz
from jaxpost.rl import reward_model as rm
from jaxpost.tokenizer import Tokenizer
from jaxpost.train.common import (
    ModelSection,
    RecipeConfig,
    model_init,
    plan_params,
    run_recipe,
    setup,
)

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
class GazeSection:
    """GazeReward: predicted eye-tracking features in the reward model (Lopez-Cardona et al., ICLR 2025)."""

    mode: Literal["off", "add", "concat"] = "off"  # "add": projected features added to the token embeddings (GazeAdd); "concat": placed before the text between <eye/> and </eye> (GazeConcat); "off": plain reward model (the ablation)
    predictor: str = "psycholinguistic"  # "psycholinguistic", "regressor:WORKDIR" (a gaze_predictor run), or "package.module:factory(key=value)" of an object with predict_words(words) (remapped to tokens) or token_features(tokenizer, text)
    features: tuple[str, ...] = ("TRT",)  # predicted features used, in order (k = how many): among nFix, FFD, GPT, TRT, fixProp
    scale: tuple[float, ...] = (100.0,)  # divisor per feature (one value: all) so the projector sees O(1) inputs: reading times are in ms
    width: int = 128  # the projector's inner width (k -> width -> hidden)
    dropout: tuple[float, float] = (0.1, 0.3)  # projector dropout (after ReLU, after the second Linear): the paper's fp_dropout
    output_scale: float = 1.0  # initial scale of the projector's last LayerNorm: 1 is PyTorch's (the paper's); its output then has unit size per component, far above token embeddings of std initializer_range

    def __post_init__(self):
        self.spec(1)  # validates mode, width and dropout
        if not self.features:
            raise ValueError("gaze.features must name at least one feature, e.g. ('TRT',)")
        if len(self.scale) not in (1, len(self.features)) or any(x <= 0 for x in self.scale):
            raise ValueError(f"gaze.scale={self.scale!r}: one positive divisor, or one per "
                             f"feature of gaze.features={self.features!r}")

    def spec(self, num_features: int | None = None) -> rm.GazeSpec:
        """The model-side `GazeSpec`."""
        return rm.GazeSpec(mode=self.mode, num_features=num_features or len(self.features),
                           width=self.width, dropout=tuple(self.dropout),
                           output_scale=self.output_scale)

    def metadata(self) -> dict:
        """What a checkpoint records (`reward_model.gaze`): enough to score with it."""
        scale = self.scale if len(self.scale) > 1 else self.scale * len(self.features)
        return {"mode": self.mode, "num_features": len(self.features), "width": self.width,
                "dropout": list(self.dropout), "output_scale": self.output_scale,
                "predictor": self.predictor,
                "features": list(self.features), "scale": list(scale)}


@dataclasses.dataclass(frozen=True)
class RewardModelConfig(RecipeConfig):
    """Bradley–Terry reward model on preference pairs (InstructGPT's RM stage).

    Freeze rules and LoRA apply to the backbone (`model.layers...` names); the score head
    (`score.weight`, `score.bias`) always trains unless a `freeze` rule names it (PEFT's
    `modules_to_save` for sequence classification)."""

    trainer: str = "reward_model"  # which trainer runs this config
    model: ModelSection = ModelSection()  # the backbone: hf_path / init_from (an SFT or reward-model workdir) / preset / shape
    data: PreferenceDataSection = PreferenceDataSection()
    head: RewardHeadSection = RewardHeadSection()
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-5)
    eval: PreferenceEvalSection = PreferenceEvalSection()
    gaze: GazeSection = GazeSection()

    identity_keys: ClassVar[tuple[str, ...]] = RecipeConfig.identity_keys + (
        "gaze.mode", "gaze.predictor", "gaze.features", "gaze.scale", "gaze.width")


# --------------------------------------------------------------------------------- eval
class PairwiseEval:
    """Pairwise accuracy, loss, margin and mean scores on fixed held-out pairs."""

    def __init__(self, pairs: Sequence[tuple], loss_fn, mesh,
                 param_shardings, *, seq_len: int, batch_size: int, pad_id: int,
                 truncation: str = "truncate_left", rules=sh.DEFAULT_RULES,
                 num_features: int = 0):
        procs = jax.process_count()
        self.batch_size = -(-batch_size // procs) * procs  # a multiple of the processes
        self.pairs, self.mesh, self.rules = list(pairs), mesh, rules
        self.seq_len, self.pad_id, self.truncation = seq_len, pad_id, truncation
        self.num_features = num_features  # k > 0: pairs are (chosen, rejected, chosen gaze, rejected gaze)

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
            k = self.num_features
            empty = np.zeros((0, k), np.float32)
            chunk = chunk + [([], [], empty, empty) if k else ([], [])] * (b - len(chunk))
            rows = slice(pid * local, (pid + 1) * local)
            gaze = {} if not k else {"chosen_gaze": [p[2] for p in chunk[rows]],
                                     "rejected_gaze": [p[3] for p in chunk[rows]],
                                     "num_features": k}
            batch = pair_batch([p[0] for p in chunk[rows]], [p[1] for p in chunk[rows]],
                               self.seq_len, self.pad_id, self.truncation, **gaze)
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
                                        skip_malformed=d.skip_malformed,
                                        skip_hint="pass --config.data.skip_malformed=True")
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
        self.featurize = None
        if cfg.gaze.mode != "off":
            self.featurize = gz.featurizer_from_spec(tokenizer, cfg.gaze.predictor,
                                                     cfg.gaze.features, cfg.gaze.scale)
        self.iterator = PreferenceBatches(
            source, indices, tokenizer, batch_size=d.batch_size // procs, seq_len=d.seq_len,
            truncation=d.truncation, chat=d.chat, seed=cfg.seed, shuffle=d.shuffle,
            process_index=jax.process_index(), process_count=procs, featurize=self.featurize)
        self.loss_fn = rm.make_reward_model_loss(model_cfg, cfg.head.center_rewards_coefficient,
                                                 cfg.gaze.spec())
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
            if self.featurize is None:
                pair = encode_pair(self.tokenizer, source[int(i)], chat=d.chat)
            else:
                (c, cg), (r, rg) = encode_pair_features(self.tokenizer, source[int(i)],
                                                        self.featurize, chat=d.chat)
                pair = (c, r, cg, rg)
            if d.truncation == "drop" and max(len(pair[0]), len(pair[1])) > d.seq_len:
                continue
            pairs.append(pair)
        return PairwiseEval(pairs, self.loss_fn, seq_len=d.seq_len, batch_size=e.batch_size,
                            pad_id=self.tokenizer.pad_id, truncation=d.truncation,
                            num_features=len(self.cfg.gaze.features) if self.featurize else 0,
                            **self._eval_args)

    def evaluate(self, params, step: int) -> dict[str, float]:
        del step
        if self._evaluator is None:
            self._evaluator = self._make_evaluator()
        return self._evaluator(params)


# -------------------------------------------------------------------------------- train
def _is_reward_model_workdir(workdir: str) -> bool:
    if latest_run_step(workdir) is None:
        return False  # model_init reports the missing checkpoint
    return "reward_model" in run_metadata(workdir)


def _reward_model_start(workdir: str, step: int | None, model_cfg, gaze: rm.GazeSpec, mesh,
                        fresh_gaze):
    """The params of another reward model's run as this run's start: all of them when it
    has the same gaze spec, else its backbone and head with `fresh_gaze()` beside them (a
    plain reward model as the start of a GazeReward one, or the reverse)."""
    theirs = rm.gaze_spec_of(run_metadata(workdir, step))
    same = theirs == gaze or (not theirs.enabled and not gaze.enabled)
    abstract = rm.rm_param_shapes(model_cfg, theirs)
    shardings = rm.rm_param_shardings(model_cfg, mesh, gaze=theirs)
    with open_run(workdir, step) as run:
        params = run.restore_params(abstract, shardings)
    if same:
        return params
    log.info("init_from %s: its gaze (%s) differs from this run's (%s); keeping its backbone "
             "and head, with new gaze params", workdir, theirs, gaze)
    params = {rm.BACKBONE: params[rm.BACKBONE], rm.HEAD: params[rm.HEAD]}
    if gaze.enabled:
        params[rm.GAZE] = fresh_gaze()
    return params


def train(cfg: RewardModelConfig):
    """Runs (or resumes) a reward-model recipe; returns the loop's result."""
    tokenizer, mesh, model_cfg = setup(cfg.model, cfg.mesh, cfg.data.tokenizer, cfg.distributed)
    backbone_init, _, _ = model_init(cfg.model, model_cfg, mesh, cfg.seed)
    gaze = cfg.gaze.spec()
    abstract = rm.rm_param_shapes(model_cfg, gaze)
    shardings = rm.rm_param_shardings(model_cfg, mesh, gaze=gaze)

    def fresh_gaze():
        gaze_rng = jax.random.fold_in(jax.random.key(cfg.seed), 3)
        return jax.jit(lambda: gz.init_gaze(gaze, model_cfg, gaze_rng),
                       out_shardings=shardings[rm.GAZE])()

    def init():
        if cfg.model.init_from and _is_reward_model_workdir(cfg.model.init_from):
            return _reward_model_start(cfg.model.init_from, cfg.model.init_step or None,
                                       model_cfg, gaze, mesh, fresh_gaze)  # head included
        head_rng = jax.random.fold_in(jax.random.key(cfg.seed), 1)
        head = jax.jit(lambda: rm.init_head(model_cfg, head_rng, cfg.head.head_init_std),
                       out_shardings=shardings[rm.HEAD])()
        params = {rm.BACKBONE: backbone_init(), rm.HEAD: head}
        if gaze.enabled:
            params[rm.GAZE] = fresh_gaze()
        return params

    keep = ((r"^score\.", "reward-model head"), (r"^gaze\.", "GazeReward projector"))
    plan = plan_params(cfg, model_cfg, init, abstract, shardings,
                       rm.rm_param_logical_axes(model_cfg, gaze), mesh,
                       extra_rules=Rules(keep=keep if gaze.enabled else keep[:1]))
    task = RewardModelTask(cfg, plan.model_cfg, tokenizer, mesh, plan.shardings)
    info = {"backbone": rm.BACKBONE, "head": rm.HEAD, "pooling": "last_token"}
    if gaze.enabled:
        info["gaze"] = cfg.gaze.metadata()
    return run_recipe(cfg, task, plan, mesh, reward_model=info)


__all__ = ["GazeSection", "PairwiseEval", "PreferenceBatches", "PreferenceDataSection",
           "PreferenceEvalSection", "RewardHeadSection", "RewardModelConfig", "RewardModelTask",
           "check_preference_source", "encode_pair", "open_preference_source", "pair_batch",
           "preference_problem", "train"]
