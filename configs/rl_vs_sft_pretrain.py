"""RL-vs-SFT study, stage 0: a small Llama learns made-up facts and 2-digit addition.

The start of `scripts/reproduce_rl_vs_sft.py` (ALGORITHMS.md §3): a ~1M-parameter model
trained on a 50/50 mixture of fact-recall chats (`jaxpost.data.facts`: 100 invented
entities x 3 attributes) and addition chats. The fine-tuning variants
(`configs/rl_vs_sft_*.py`) start from its last checkpoint and train on addition only;
recall of the facts afterwards measures what they forgot.

    python -m jaxpost.train --config=configs/rl_vs_sft_pretrain.py --config.workdir=/tmp/rvs/pretrain
"""

from ml_collections import ConfigDict

from jaxpost.config import to_config_dict
from jaxpost.train.sft import SFTConfig

#: The model every stage of the study shares (the fine-tuning configs copy it).
MODEL = (("hidden_size", 128), ("intermediate_size", 384), ("num_layers", 4),
         ("num_heads", 4), ("num_kv_heads", 2), ("head_dim", 32))


def get_config() -> ConfigDict:
    cfg = to_config_dict(SFTConfig())
    cfg.seed = 0
    cfg.steps = 1000
    cfg.log_every = 50
    cfg.checkpoint_every = 500
    cfg.eval_every = 500
    cfg.keep_checkpoints = 4
    for key, value in MODEL:
        cfg.model[key] = value
    cfg.data.source = "synthetic:facts:100+addition:2"
    cfg.data.num_records = 16000  # 8000 addition chats (of ~9000 2-digit training pairs)
    cfg.data.seq_len = 64
    cfg.data.batch_size = 32
    cfg.data.eval_batches = 0  # facts have no held-out split; the study measures recall itself
    cfg.optimizer.lr = 3e-3
    cfg.optimizer.warmup_steps = 50
    cfg.optimizer.schedule = "cosine"
    cfg.optimizer.min_lr_ratio = 0.1
    cfg.optimizer.weight_decay = 0.01
    cfg.eval.task = "synthetic:addition:2"
    cfg.eval.num_prompts = 200
    return cfg
