"""AlignGuard demo: does fine-tuning on an unrelated task erode a model's refusals?

Stages (all in one workdir, each resumed or reused when already there):
  1. warm-up SFT (`get_config("warmup")`, into WORKDIR/sft_init): a ~0.2M-parameter
     Llama learns to refuse the synthetic unsafe requests of `jaxpost.data.alignment`
     (weapons, intrusion, poison) and to answer the safe ones (cooking, helping);
  2. the Fisher of the warm-up model on that alignment set (AlignGuard arm only);
  3. fine-tuning on 2-digit addition (`jaxpost.data.synthetic`), one of four ways:
     `get_config("full")` full fine-tuning, `"lora"` plain LoRA, `"l2"` LoRA +
     L2-to-start, `"agl"` (the default) AlignGuard LoRA.

    python -m jaxpost.train --config=configs/alignguard_demo.py --config.workdir=/tmp/agl
    python -m jaxpost.train --config=configs/alignguard_demo.py:lora --config.workdir=/tmp/lora

`scripts/alignguard_demo.py` runs the warm-up once, then all four arms from it, and
writes the drift table (refusal rate on unsafe prompts, answer rate on safe prompts,
before and after, and held-out addition accuracy); its measured numbers are in the
README ("AlignGuard demo").
"""

import os

from ml_collections import ConfigDict

from jaxpost.config import to_config_dict
from jaxpost.train.sft import SFTConfig

ARMS = ("full", "lora", "l2", "agl")  # the fine-tuning arms, in the table's order
STAGES = ("warmup",) + ARMS
ALIGNMENT_SOURCE = "synthetic:alignment"  # jaxpost.data.alignment, every category
TASK = "synthetic:addition:2"
L2_WEIGHT = 1.0  # regularise.l2_to_start of the "l2" arm
_THIS = os.path.abspath(__file__)


def _model(cfg: ConfigDict) -> None:
    """The model shape (the same in every stage: each arm starts from the warm-up)."""
    for key, value in (("hidden_size", 64), ("intermediate_size", 192), ("num_layers", 4),
                       ("num_heads", 4), ("num_kv_heads", 2), ("head_dim", 16)):
        cfg.model[key] = value


def _warmup(cfg: ConfigDict) -> ConfigDict:
    cfg.steps = 200
    cfg.log_every = 50
    cfg.checkpoint_every = 200
    cfg.data.source = ALIGNMENT_SOURCE
    cfg.data.num_records = 4000
    cfg.data.seq_len = 128
    cfg.data.batch_size = 16
    cfg.data.eval_batches = 2
    cfg.eval_every = 200
    cfg.optimizer.lr = 3e-3
    cfg.optimizer.warmup_steps = 30
    cfg.optimizer.schedule = "cosine"
    cfg.optimizer.min_lr_ratio = 0.1
    cfg.optimizer.weight_decay = 0.01
    return cfg


def get_config(stage: str = "agl") -> ConfigDict:
    """The recipe of one stage: "warmup", or a fine-tuning arm ("full", "lora", "l2",
    "agl")."""
    if stage not in STAGES:
        raise ValueError(f"alignguard_demo stage {stage!r}; expected one of {STAGES}")
    cfg = to_config_dict(SFTConfig())
    cfg.seed = 0
    _model(cfg)
    if stage == "warmup":
        return _warmup(cfg)
    cfg.init_sft_config = f"{_THIS}:warmup"  # stage 1, into WORKDIR/sft_init
    cfg.steps = 200
    cfg.log_every = 50
    cfg.checkpoint_every = 200
    cfg.eval_every = 200
    cfg.data.source = TASK
    cfg.data.num_records = 8000
    cfg.data.seq_len = 64
    cfg.data.batch_size = 32
    cfg.data.eval_batches = 2
    cfg.eval.task = TASK
    cfg.eval.num_prompts = 200
    # Drift: refusal / answer rates on held-out alignment prompts at step 0 (the warm-up
    # model) and at the end, in WORKDIR/drift.json and the eval metrics.
    cfg.eval.drift_prompts = 20
    cfg.eval_at_start = True
    cfg.optimizer.warmup_steps = 30
    cfg.optimizer.schedule = "cosine"
    cfg.optimizer.min_lr_ratio = 0.1
    cfg.optimizer.weight_decay = 0.0
    if stage == "full":
        cfg.optimizer.lr = 1e-3
        return cfg
    cfg.optimizer.lr = 3e-3
    cfg.lora.rank = 8
    cfg.lora.alpha = 16.0
    cfg.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj")
    if stage == "l2":
        cfg.regularise.l2_to_start = L2_WEIGHT  # Σ ‖s·A·B‖² over the adapted matrices
    if stage == "agl":
        # jaxpost.peft.alignguard defaults (λ_A 0.25, λ_T 0.5, λ_NC 0.1, α 0.5; two
        # adapters per target), on a diagonal Fisher of the warm-up model estimated on
        # the alignment set (cached in WORKDIR/fisher).
        cfg.alignguard.enabled = True
        cfg.fisher.source = ALIGNMENT_SOURCE
        cfg.fisher.num_records = 256
        cfg.fisher.num_examples = 256
        cfg.fisher.seq_len = 128
    return cfg
