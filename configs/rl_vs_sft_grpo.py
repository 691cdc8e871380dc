"""RL-vs-SFT study, GRPO arm: exact-answer rewards on addition from the stage-0 model.

Starts from `configs/rl_vs_sft_pretrain.py`'s last checkpoint (`model.init_from`, set by
`scripts/reproduce_rl_vs_sft.py`), with the same number of optimizer steps and
checkpoints as the SFT arms (`configs/rl_vs_sft_sft.py`). As in the seed study, GRPO runs
at a much lower learning rate than SFT (there 1e-6 vs 5e-5; here 1e-4 vs 1e-3, the
GRPO demo's rate: 3e-4 made its runs worse).

    python -m jaxpost.train --config=configs/rl_vs_sft_grpo.py --config.workdir=/tmp/rvs/grpo \
        --config.model.init_from=/tmp/rvs/pretrain
"""

import importlib.util
import os

from ml_collections import ConfigDict

from jaxpost.config import to_config_dict
from jaxpost.train.grpo import GRPOConfig


def _sft_recipe():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rl_vs_sft_sft.py")
    spec = importlib.util.spec_from_file_location("rl_vs_sft_sft", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ConfigDict:
    sft = _sft_recipe()
    cfg = to_config_dict(GRPOConfig())
    cfg.seed = 1
    cfg.steps = sft.STEPS
    cfg.log_every = 10
    cfg.checkpoint_every = sft.CHECKPOINT_EVERY
    cfg.keep_checkpoints = 10
    cfg.eval_every = 0
    for key, value in sft.pretrain_model():
        cfg.model[key] = value
    cfg.prompts.source = "synthetic:addition:2"
    cfg.prompts.num_records = 8000
    cfg.grpo.num_generations = 8
    cfg.grpo.prompts_per_step = 16
    cfg.grpo.max_prompt_length = 24
    cfg.grpo.max_completion_length = 6
    cfg.grpo.temperature = 1.0
    cfg.grpo.beta = 0.04
    cfg.grpo.loss_type = "grpo"
    cfg.grpo.num_iterations = 1
    cfg.reward_fns = ("jaxpost.rl.rewards:exact_answer",)
    cfg.reward_weights = (1.0,)
    cfg.optimizer.lr = 1e-4
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.warmup_steps = 0
    cfg.optimizer.weight_decay = 0.0
    return cfg
