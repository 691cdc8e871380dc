"""The BiLSTM gaze predictor learns the synthetic eye-tracking CSV and loads as a predictor."""

import json

import numpy as np
import pytest

from jaxpost.rl.gaze import GazePredictor, RegressorPredictor, text_token_features
from jaxpost.tokenizer import ByteTokenizer


def _config(workdir, **over):
    from jaxpost.train.__main__ import load_config
    from jaxpost.train.common import load_recipe
    cfg = load_recipe("configs/gaze_predictor.py")
    cfg.workdir = str(workdir)
    cfg.steps = 150
    cfg.eval_every = 150
    cfg.checkpoint_every = 150
    cfg.log_every = 50
    for k, v in over.items():
        cfg[k] = v
    return load_config(cfg)


@pytest.mark.slow
def test_regressor_learns_synthetic_csv_and_loads_as_a_predictor(tmp_path):
    cfg, train = _config(tmp_path)
    result = train(cfg)
    start, end = result.start_eval_metrics, result.eval_metrics
    # Held-out MSE of the standardised features: well below the mean predictor's.
    assert end["eval_mse"] < 0.3 * end["eval_mse_mean_predictor"]
    assert end["eval_mse"] < 0.5 * start["eval_mse"]
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(x) for x in f]
    assert lines[-1]["step"] == 150 and "eval_r2" in lines[-1]

    pred = RegressorPredictor.from_workdir(str(tmp_path))
    assert isinstance(pred, GazePredictor) and "TRT" in pred.features
    # In the synthetic corpus short frequent words ("a", "e") read faster than long rare ones.
    out = pred.predict_words(["a", "ostlosorplegla", "e", "dru."])
    assert out["TRT"].shape == (4,) and out["TRT"][1] > out["TRT"][0] + 50
    _, feats = text_token_features(pred, ByteTokenizer(), "<bos>a ostlosorplegla<eos>")
    two = pred.predict_words(["a", "ostlosorplegla"])["TRT"]  # the same words in context
    np.testing.assert_allclose(feats["TRT"].sum(), two.sum(), rtol=1e-4)
    assert feats["TRT"][0] == 0 and feats["TRT"][-1] == 0


def test_lora_or_freeze_keys_are_refused_for_the_regressor(tmp_path):
    cfg, train = _config(tmp_path, freeze=("embed",))
    with pytest.raises(ValueError, match="the gaze regressor trains all its parameters"):
        train(cfg)
