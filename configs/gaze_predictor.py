"""Gaze predictor: a BiLSTM over byte tokens learns word-level eye-tracking features.

Trains on the synthetic corpus shipped in `jaxpost/data/eye_tracking_synthetic.csv`
(ZuCo / CMCL 2021 layout; `jaxpost.data.eye_tracking.synthetic_eye_tracking_rows`);
point `data.csv` at a real corpus in the same layout (ZuCo, GECO, Provo converted) for
a real predictor. Reports held-out `eval_mse` of the standardised features against
`eval_mse_mean_predictor` (the training mean), and `eval_r2`.

    python -m jaxpost.train --config=configs/gaze_predictor.py --config.workdir=/tmp/gaze_rp

Then use it for GRPO credit:
`--config.token_credit="jaxpost.rl.gaze:gaze_credit(predictor='regressor:/tmp/gaze_rp')"`.
"""

from ml_collections import ConfigDict

from jaxpost.config import to_config_dict
from jaxpost.train.gaze_predictor import GazePredictorConfig


def get_config() -> ConfigDict:
    cfg = to_config_dict(GazePredictorConfig())
    cfg.seed = 0
    cfg.steps = 300
    cfg.log_every = 25
    cfg.checkpoint_every = 300
    cfg.eval_every = 100
    cfg.eval_at_start = True
    cfg.data.tokenizer = "byte"
    cfg.data.batch_size = 32
    cfg.data.heldout_fraction = 0.1
    cfg.regressor.embed_dim = 32
    cfg.regressor.hidden_dim = 48
    cfg.regressor.dropout = 0.1
    cfg.optimizer.lr = 3e-3
    cfg.optimizer.warmup_steps = 20
    cfg.optimizer.schedule = "cosine"
    cfg.optimizer.min_lr_ratio = 0.1
    cfg.optimizer.weight_decay = 0.0
    return cfg
