"""GazeReward demo: the reward-model demo (configs/rm_demo.py) with predicted gaze features
fed into the reward model (Lopez-Cardona et al., ICLR 2025; ALGORITHMS.md §2.1).

Each token gets the total reading time (TRT, ms / 100) that the psycholinguistic
predictor (`jaxpost.rl.gaze.PsycholinguisticPredictor`: word length, word frequency;
no eye-tracking data) gives its word, split evenly over the word's tokens; a projector
(1 -> 128 -> hidden, LayerNorm, ReLU, dropout 0.1 / 0.3) adds it to the token
embeddings (`gaze.mode="add"`, GazeAdd) or places it before the text between `<eye/>`
and `</eye>` (`--config.gaze.mode=concat`, GazeConcat). `--config.gaze.mode=off` is the
ablation: the same recipe as a plain reward model.

    python -m jaxpost.train --config=configs/gaze_rm_demo.py --config.workdir=/tmp/gaze_rm

The trained model is a GRPO reward function like any reward model (gaze features of
each completion are computed at reward time):
`"jaxpost.rl.reward_model:from_workdir(workdir='/tmp/gaze_rm')"`.
"""

import importlib.util
import os

from ml_collections import ConfigDict


def _rm_demo():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rm_demo.py")
    spec = importlib.util.spec_from_file_location("rm_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ConfigDict:
    cfg = _rm_demo()
    cfg.gaze.mode = "add"
    cfg.gaze.predictor = "psycholinguistic"
    cfg.gaze.features = ("TRT",)
    cfg.gaze.scale = (100.0,)
    cfg.gaze.width = 128
    cfg.gaze.dropout = (0.1, 0.3)
    # The paper's projector ends in a LayerNorm initialised to scale 1: its output, about 1
    # per component, drowns token embeddings of std 0.02, and a small model learns nothing
    # for many steps (README). Start it at the embeddings' scale instead.
    cfg.gaze.output_scale = 0.02
    return cfg
