"""RL-vs-SFT study, SFT variants: fine-tune the stage-0 model on addition only.

Starts from `configs/rl_vs_sft_pretrain.py`'s last checkpoint (`model.init_from`, set by
`scripts/reproduce_rl_vs_sft.py`). The same file serves the three SFT arms of the study:
plain (every tensor trains), `--config.freeze_preset="mid_mlp(1,3)"` (the MLPs of the two
middle layers of four frozen) and `--config.freeze_preset=qk_only` (only q_proj/k_proj
train). Same steps and checkpoints as `configs/rl_vs_sft_grpo.py`.

    python -m jaxpost.train --config=configs/rl_vs_sft_sft.py --config.workdir=/tmp/rvs/sft \
        --config.model.init_from=/tmp/rvs/pretrain
"""

import importlib.util
import os

from ml_collections import ConfigDict

from jaxpost.config import to_config_dict
from jaxpost.train.sft import SFTConfig

STEPS = 120  # every fine-tuning arm (SFT and GRPO) takes this many optimizer steps
CHECKPOINT_EVERY = 30  # so the analysis sees a trajectory of 4 checkpoints


def pretrain_model() -> tuple:
    """The model shape of the stage-0 recipe (read from it, so the two never drift)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rl_vs_sft_pretrain.py")
    spec = importlib.util.spec_from_file_location("rl_vs_sft_pretrain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MODEL


def get_config() -> ConfigDict:
    cfg = to_config_dict(SFTConfig())
    cfg.seed = 1
    cfg.steps = STEPS
    cfg.log_every = 10
    cfg.checkpoint_every = CHECKPOINT_EVERY
    cfg.keep_checkpoints = 10
    cfg.eval_every = 0  # the study script evaluates every checkpoint itself
    for key, value in pretrain_model():
        cfg.model[key] = value
    cfg.data.source = "synthetic:addition:2"
    cfg.data.num_records = 8000
    cfg.data.seq_len = 64
    cfg.data.batch_size = 32
    cfg.data.eval_batches = 0
    cfg.optimizer.lr = 1e-3
    cfg.optimizer.warmup_steps = 10
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.weight_decay = 0.0
    return cfg
