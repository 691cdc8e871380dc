"""PPO gaze demo: the mention task with a value head and GAE, with or without GazeDistrib.

The policy is warmed up by configs/sft_mention.py (trained first into WORKDIR/sft_init
when `model.init_from` is unset), then PPO (shared-trunk value head, GAE gamma 1 and lam
0.95, k1 KL to the warm-up policy at beta 0.05) optimises the task reward
(`jaxpost.rl.mention:mention_reward`, the fraction of the two asked-for words that the
~9-token answer names). The sequence reward goes on the last token (TRL's PPO), or with
`ppo.gaze_predictor="psycholinguistic"` it is spread over the tokens by predicted reading
time (GazeDistrib, Galliamov et al. 2025; the content words are long and rare, so they
get most of it). `scripts/ppo_gaze_demo.py` runs both arms over several seeds and writes
a table and a reward-vs-step plot; the measured table is in the README ("PPO").

    python -m jaxpost.train --config=configs/ppo_gaze_demo.py --config.workdir=/tmp/ppo_gaze \
        --config.ppo.gaze_predictor=psycholinguistic
"""

import os

from ml_collections import ConfigDict

from jaxpost.config import to_config_dict
from jaxpost.data.mention import TOKENIZER_DIR
from jaxpost.train.ppo import PPOConfig

#: The SFT warm-up's model shape (configs/sft_mention.py).
MODEL = (("hidden_size", 64), ("intermediate_size", 192), ("num_layers", 2),
         ("num_heads", 4), ("num_kv_heads", 2), ("head_dim", 16))

#: The gaze arm's reading-time predictor.
GAZE_PREDICTOR = "psycholinguistic"


def get_config() -> ConfigDict:
    cfg = to_config_dict(PPOConfig())
    cfg.seed = 0
    cfg.steps = 120  # 30 rollouts x (2 epochs x 2 mini-batches)
    cfg.log_every = 1
    cfg.checkpoint_every = 0  # the last step only
    cfg.init_sft_config = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "sft_mention.py")
    for key, value in MODEL:
        cfg.model[key] = value
    cfg.prompts.source = "synthetic:mention:0.5"
    cfg.prompts.num_records = 4000
    cfg.prompts.tokenizer = TOKENIZER_DIR
    cfg.ppo.prompts_per_step = 32
    cfg.ppo.num_generations = 1
    cfg.ppo.max_prompt_length = 24
    cfg.ppo.max_completion_length = 14
    cfg.ppo.temperature = 1.0
    cfg.ppo.num_ppo_epochs = 2
    cfg.ppo.num_mini_batches = 2
    cfg.ppo.cliprange = 0.2
    cfg.ppo.cliprange_value = 0.2
    cfg.ppo.vf_coef = 0.1
    cfg.ppo.gamma = 1.0
    cfg.ppo.lam = 0.95
    cfg.ppo.kl_coef = 0.05
    cfg.ppo.kl_estimator = "k1"
    cfg.ppo.value_model = "shared"
    cfg.ppo.gaze_predictor = ""  # last-token reward; the gaze arm sets GAZE_PREDICTOR
    cfg.ppo.gaze_standardize = True
    cfg.ppo.gaze_temperature = 1.0
    cfg.reward_fns = ("jaxpost.rl.mention:mention_reward",)
    cfg.reward_weights = (1.0,)
    cfg.optimizer.lr = 3e-4
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.warmup_steps = 0
    cfg.optimizer.weight_decay = 0.0
    return cfg
