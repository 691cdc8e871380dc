"""SFT warm-up of the gaze demo: a ~0.1M-parameter Llama learns to answer "Mention A and
B." with a sentence that names A and B only half of the time each (the rest: other
entities), so GRPO starts from a mean mention reward of at most 0.5 (less where copying is not yet learned) (`jaxpost.data.mention`).

    python -m jaxpost.train --config=configs/sft_mention.py --config.workdir=/tmp/sft_mention
"""

from ml_collections import ConfigDict

from jaxpost.config import to_config_dict
from jaxpost.data.mention import TOKENIZER_DIR
from jaxpost.train.sft import SFTConfig

#: The model shape, shared with configs/grpo_gaze_demo.py.
MODEL = (("hidden_size", 64), ("intermediate_size", 192), ("num_layers", 2),
         ("num_heads", 4), ("num_kv_heads", 2), ("head_dim", 16))


def get_config() -> ConfigDict:
    cfg = to_config_dict(SFTConfig())
    cfg.seed = 0
    cfg.steps = 400
    cfg.log_every = 50
    cfg.checkpoint_every = 400
    for key, value in MODEL:
        cfg.model[key] = value
    cfg.data.source = "synthetic:mention:0.5"
    cfg.data.num_records = 8000
    cfg.data.tokenizer = TOKENIZER_DIR
    cfg.data.seq_len = 64
    cfg.data.batch_size = 32
    cfg.optimizer.lr = 3e-3
    cfg.optimizer.warmup_steps = 30
    cfg.optimizer.schedule = "cosine"
    cfg.optimizer.min_lr_ratio = 0.1
    cfg.optimizer.weight_decay = 0.01
    return cfg
