"""Reward-model demo: a ~0.23M-parameter Llama trained as a Bradley–Terry reward model on
synthetic addition preferences, from random weights, on a 2-core CPU in about two minutes
with nothing downloaded.

Pairs come from `jaxpost.data.synthetic.addition_preference_records`: the prompt "What is
47+58?", chosen "105", rejected a near miss ("103", "115", "185", ...). It reports
held-out pairwise accuracy (`eval_accuracy`; 0.5 is chance). Measured: 0.53 after the 600
steps. Telling a near miss from the right sum needs the model to verify the addition,
which a randomly initialised model this small does not learn from pairwise labels in this
budget (over 2,500 steps the training loss falls while held-out accuracy stays at chance:
it memorises training problems). It is the pipeline demo; for a useful reward model start from an SFT checkpoint of the same shape
(`--config.model.init_from=WORKDIR`, e.g. of configs/sft_demo.py, the InstructGPT recipe).

    python -m jaxpost.train --config=configs/rm_demo.py --config.workdir=/tmp/rm_demo

The trained model is then a GRPO reward function:
`"jaxpost.rl.reward_model:from_workdir(workdir='/tmp/rm_demo')"`.
"""

from ml_collections import ConfigDict

from jaxpost.config import to_config_dict
from jaxpost.train.reward_model import RewardModelConfig


def get_config() -> ConfigDict:
    cfg = to_config_dict(RewardModelConfig())
    cfg.seed = 0
    cfg.steps = 600
    cfg.log_every = 50
    cfg.checkpoint_every = 300
    cfg.eval_every = 200
    cfg.model.hidden_size = 64
    cfg.model.intermediate_size = 192
    cfg.model.num_layers = 4
    cfg.model.num_heads = 4
    cfg.model.num_kv_heads = 2
    cfg.model.head_dim = 16
    cfg.data.source = "synthetic:addition:2"
    cfg.data.num_records = 8000
    cfg.data.seq_len = 24
    cfg.data.batch_size = 32
    cfg.optimizer.lr = 3e-3
    cfg.optimizer.warmup_steps = 50
    cfg.optimizer.schedule = "cosine"
    cfg.optimizer.min_lr_ratio = 0.1
    cfg.optimizer.weight_decay = 0.01
    cfg.eval.num_pairs = 500
    cfg.eval.batch_size = 100
    return cfg
