"""Recipe wiring of the regularisers: the `fisher` and `regularise` sections, the Fisher
recipe step (estimate once on the alignment data, cache, reuse), and the train-step
`Regulariser`s a recipe's `regularise` and `alignguard` sections ask for."""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np

from jaxpost import data
from jaxpost.peft import alignguard as AG
from jaxpost.peft import fisher as FI
from jaxpost.peft import lora as L
from jaxpost.peft import partition
from jaxpost.peft import regularisers as R

log = logging.getLogger(__name__)

FISHER_KINDS = (FI.DIAGONAL, FI.KFAC)


@dataclasses.dataclass(frozen=True)
class FisherSection:
    """The recipe section `fisher`: the base model's Fisher on an alignment set (used by
    `alignguard` and `regularise.ewc`), estimated once and cached."""

    kind: str = "diagonal"  # "diagonal" (mean squared per-example gradient) or "kfac" (per-kernel input/output-gradient covariances; LoRA targets only)
    source: str = ""  # alignment data in any SFT format (JSONL prompt/completion, ...): refusals on unsafe prompts, helpful answers on safe ones; required when a Fisher is needed
    split: str = "train"  # split of `source` (TFDS / synthetic)
    num_records: int = 256  # synthetic sources: how many records
    num_examples: int = 256  # examples used at most (one per row, in source order)
    batch_size: int = 16  # examples per estimation batch (per-example gradients of this many rows at once)
    chunk: int = 0  # diagonal: rows per vmap call within a batch (0: the whole batch); bounds memory
    seq_len: int = 0  # tokens per example (0: data.seq_len); longer examples are truncated as data.truncation says
    top_k_in: int = 8  # kfac: eigenvectors of S_in kept per kernel (P_A and the low-rank Fisher)
    top_k_out: int = 8  # kfac: eigenvectors of S_out kept per kernel
    path: str = ""  # where the Fisher is cached ("" = WORKDIR/fisher); an existing one made for another model or data is refused

    def __post_init__(self):
        if self.kind not in FISHER_KINDS:
            raise ValueError(f"fisher.kind={self.kind!r}; expected one of {FISHER_KINDS}")
        for name in ("num_examples", "batch_size", "top_k_in", "top_k_out"):
            if getattr(self, name) < 1:
                raise ValueError(f"fisher.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RegulariseSection:
    """The recipe section `regularise`: simple anchors to the starting weights, for full
    fine-tuning (ΔW = W − W0) and LoRA (ΔW = s·A·B) alike, added once per step."""

    l2_to_start: float = 0.0  # weight of Σ ‖ΔW‖² (logged as reg_l2_to_start); 0: off
    ewc: float = 0.0  # weight of Σ F ⊙ ΔW² with the diagonal Fisher of the `fisher` section (EWC, Kirkpatrick et al. 2017; logged as reg_ewc); 0: off


def needs_fisher(cfg) -> bool:
    """Whether the recipe's regularisers read a Fisher."""
    return cfg.alignguard.active or cfg.regularise.ewc > 0


def check_config(cfg) -> None:
    """Config-time checks and warnings of the `alignguard`/`regularise`/`fisher` keys."""
    agl, reg, fs = cfg.alignguard, cfg.regularise, cfg.fisher
    if agl.enabled and not cfg.lora.enabled:
        raise ValueError("alignguard.enabled needs LoRA: set lora.rank > 0 (AlignGuard "
                         "regularises adapter updates)")
    if reg.ewc > 0 and fs.kind != FI.DIAGONAL:
        raise ValueError(f"regularise.ewc needs fisher.kind='diagonal', got {fs.kind!r}")
    if fs.kind == FI.KFAC and needs_fisher(cfg) and not cfg.lora.enabled:
        raise ValueError("fisher.kind='kfac' is per LoRA target kernel: set lora.rank > 0")
    if needs_fisher(cfg) and not fs.source:
        raise ValueError("fisher.source is empty: the alignment data the Fisher is estimated "
                         "on (SFT records, e.g. a JSONL of prompt/completion refusals)")
    if reg.l2_to_start < 0 or reg.ewc < 0:
        raise ValueError("regularise.l2_to_start and regularise.ewc must be >= 0")
    for message in AG.config_warnings(agl, fs.kind):
        log.warning("%s", message)


def fisher_paths(plan) -> list[tuple[str, ...]]:
    """The leaves the Fisher covers: the LoRA target kernels, or every trainable leaf."""
    if plan.lora.enabled:
        return list(L.lora_targets(plan.abstract, plan.lora))
    return [tuple(str(getattr(k, "key", k)) for k in p) for p, m in
            jax.tree_util.tree_flatten_with_path(plan.mask, is_leaf=lambda x: isinstance(
                x, (bool, np.bool_, np.ndarray)))[0]
            if m is True or isinstance(m, np.ndarray)]


def alignment_batches(cfg, tokenizer) -> list[dict]:
    """The alignment examples as SFT batches, one example per row, in source order."""
    fs, d = cfg.fisher, cfg.data
    source = data.open_source(fs.source, split=fs.split, num_records=fs.num_records,
                              seed=cfg.seed)
    it = data.make_sft_iterator(source, tokenizer, seq_len=fs.seq_len or d.seq_len,
                                batch_size=fs.batch_size, pack=False, seed=cfg.seed,
                                shuffle=False, num_epochs=1, truncation=d.truncation,
                                num_threads=0)
    batches, rows = [], 0
    for batch in it:
        batch = {k: np.asarray(v) for k, v in batch.items()}
        take = min(batch["tokens"].shape[0], fs.num_examples - rows)
        if take < batch["tokens"].shape[0]:
            batch = {k: v.copy() for k, v in batch.items()}
            batch["loss_mask"][take:] = 0  # beyond num_examples: no targets, not counted
        batches.append(batch)
        rows += take
        if rows >= fs.num_examples:
            break
    if not batches:
        raise ValueError(f"fisher.source={fs.source!r} gave no examples")
    return batches


def _subtree_shardings(shardings, paths):
    return FI.select_paths(shardings, paths)


def ensure_fisher(cfg, plan, model_cfg, tokenizer) -> FI.Fisher:
    """The recipe step: loads the Fisher cached at `fisher.path` (default
    `WORKDIR/fisher`) if its fingerprint matches this base model and data, else
    estimates it with the base params (adapters off) and saves it.

    Raises:
      FisherMismatchError: a cached Fisher made for another model or data.
    """
    fs = cfg.fisher
    path = fs.path or os.path.join(cfg.workdir, "fisher")
    base = L.strip_adapters(plan.init())
    batches = alignment_batches(cfg, tokenizer)
    paths = fisher_paths(plan)
    identity = {"source": fs.source, "split": fs.split, "num_records": fs.num_records,
                "num_examples": fs.num_examples, "seq_len": fs.seq_len or cfg.data.seq_len,
                "tokenizer": cfg.data.tokenizer, "digest": FI.data_digest(batches),
                "kind": fs.kind, "paths": ["/".join(p) for p in paths]}
    if fs.kind == FI.KFAC:
        identity.update(top_k_in=fs.top_k_in, top_k_out=fs.top_k_out)
    expected = FI.fingerprint(model_cfg, base, identity)
    shardings = _subtree_shardings(L.strip_adapters(plan.shardings), paths) \
        if fs.kind == FI.DIAGONAL else None
    if os.path.exists(os.path.join(path, "fisher.json")):
        def place(keys, shape):
            if shardings is None:
                return jax.sharding.SingleDeviceSharding(jax.devices()[0])
            node = shardings
            for k in keys:
                node = node[k]
            return node
        fisher = FI.load_fisher(path, expected, kind=fs.kind, shardings=place)
        log.info("reusing the %s Fisher in %s (%d examples)", fisher.kind, path,
                 fisher.num_examples)
        return fisher
    log.info("estimating the %s Fisher on %s (%d examples) into %s", fs.kind, fs.source,
             fs.num_examples, path)
    if fs.kind == FI.DIAGONAL:
        fisher = FI.diagonal_fisher(model_cfg, base, batches, FI.select_paths(base, paths),
                                    shardings=shardings, chunk=fs.chunk)
    else:
        fisher = FI.kfac_factors(model_cfg, base, batches, paths, top_k_in=fs.top_k_in,
                                 top_k_out=fs.top_k_out)
    fisher.fingerprint = expected
    FI.save_fisher(fisher, path)
    return fisher


def recipe_regularisers(cfg, plan, fisher: FI.Fisher | None) -> tuple[R.Regulariser, ...]:
    """The train-step regularisers of the `regularise` and `alignguard` sections."""
    reg, agl = cfg.regularise, cfg.alignguard
    out = []
    scale = plan.lora.scale if plan.lora.enabled else 0.0
    anchor = None
    if not scale and (reg.l2_to_start > 0 or reg.ewc > 0):
        # W0: the starting values of the trainable params, rebuilt from the run's start
        # (deterministic), so a resumed run keeps the same anchor.
        anchor = partition.split(plan.init(), plan.mask)[0]
    if reg.l2_to_start > 0:
        out.append(R.l2_to_start(reg.l2_to_start, lora_scale=scale, anchor=anchor))
    if reg.ewc > 0:
        if anchor is not None:
            anchor = FI.select_paths(anchor, fisher_paths(plan))
        out.append(R.ewc(reg.ewc, fisher.tree, lora_scale=scale, anchor=anchor))
    if agl.active:
        out.append(AG.alignguard_regulariser(agl, AG.fisher_stats(fisher, agl), scale))
    return tuple(out)


def regularisers_for(cfg, plan, model_cfg, tokenizer) -> tuple[R.Regulariser, ...]:
    """The Fisher step when needed, then `recipe_regularisers` (the config was checked
    by `check_config` when it was built)."""
    fisher = ensure_fisher(cfg, plan, model_cfg, tokenizer) if needs_fisher(cfg) else None
    return recipe_regularisers(cfg, plan, fisher)


__all__ = ["FisherSection", "RegulariseSection", "alignment_batches", "check_config",
           "ensure_fisher", "fisher_paths", "needs_fisher", "recipe_regularisers",
           "regularisers_for"]
