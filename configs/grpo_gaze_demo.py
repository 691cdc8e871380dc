"""GRPO gaze demo: the mention task, with or without GazeDistrib token credit.

The policy (warmed up by configs/sft_mention.py, trained first into WORKDIR/sft_init
when `model.init_from` is unset) answers "Mention A and B." with a ~9-token sentence; the
reward is the fraction of A, B it names (`jaxpost.rl.mention:mention_reward`), decided by
two content words among filler. Plain GRPO gives every token the sequence advantage;
with `token_credit = "jaxpost.rl.gaze:gaze_credit(...)"` the advantage is weighted by
predicted reading time (PsycholinguisticPredictor: long, rare words read longer).
`scripts/grpo_gaze_demo.py` runs both over several seeds; its measured table is in the
README ("Gaze-weighted token credit").

    python -m jaxpost.train --config=configs/grpo_gaze_demo.py --config.workdir=/tmp/gaze \
        --config.token_credit="jaxpost.rl.gaze:gaze_credit(standardize=True)"
"""

import os

from ml_collections import ConfigDict

from jaxpost.config import to_config_dict
from jaxpost.data.mention import TOKENIZER_DIR
from jaxpost.train.grpo import GRPOConfig

#: The SFT warm-up's model shape (configs/sft_mention.py).
MODEL = (("hidden_size", 64), ("intermediate_size", 192), ("num_layers", 2),
         ("num_heads", 4), ("num_kv_heads", 2), ("head_dim", 16))

#: The gaze arm's token credit.
GAZE_CREDIT = "jaxpost.rl.gaze:gaze_credit(standardize=True, temperature=1.0)"


def get_config() -> ConfigDict:
    cfg = to_config_dict(GRPOConfig())
    cfg.seed = 0
    cfg.steps = 60
    cfg.log_every = 1
    cfg.checkpoint_every = 0  # the last step only
    cfg.init_sft_config = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "sft_mention.py")
    for key, value in MODEL:
        cfg.model[key] = value
    cfg.prompts.source = "synthetic:mention:0.5"
    cfg.prompts.num_records = 4000
    cfg.prompts.tokenizer = TOKENIZER_DIR
    cfg.grpo.num_generations = 8
    cfg.grpo.prompts_per_step = 16
    cfg.grpo.max_prompt_length = 24
    cfg.grpo.max_completion_length = 14
    cfg.grpo.temperature = 1.0
    cfg.grpo.beta = 0.0
    cfg.grpo.loss_type = "grpo"
    cfg.grpo.num_iterations = 1
    cfg.reward_fns = ("jaxpost.rl.mention:mention_reward",)
    cfg.reward_weights = (1.0,)
    cfg.token_credit = ""  # plain GRPO; the gaze arm sets GAZE_CREDIT
    cfg.token_credit_mode = "weighted"
    cfg.optimizer.lr = 3e-4
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.warmup_steps = 0
    cfg.optimizer.weight_decay = 0.0
    return cfg
