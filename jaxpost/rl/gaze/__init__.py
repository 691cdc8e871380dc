"""Gaze: predicted human reading behaviour as a signal for RL from rewards.

- Predictors (`predict_words(words) -> {feature: [W]}`, `TRT` always):
  `PsycholinguisticPredictor` (length, frequency, optional surprisal; no eye-tracking
  data) and `RegressorPredictor` (a BiLSTM trained on an eye-tracking CSV,
  `jaxpost.rl.gaze.regressor`, recipe `configs/gaze_predictor.py`).
- Words -> tokens (`remap`): a word's value split evenly over its tokens, special tokens
  get nothing, for any of jaxpost's tokenizers.
- GazeDistrib (`distribute_reward`, Galliamov et al. 2025, ALGORITHMS.md 2.2) and its use
  as GRPO token credit (`gaze_credit`, through `jaxpost.rl.credit`).
"""

from jaxpost.rl.gaze.credit import gaze_credit, load_predictor, reading_times
from jaxpost.rl.gaze.distrib import check_rows, distribute_reward, gaze_weights, standardize
from jaxpost.rl.gaze.predictors import (
    FEATURES, GazePredictor, PsycholinguisticPredictor, check_prediction, letters,
    zipf_frequency)
from jaxpost.rl.gaze.remap import (
    Word, split_words, spread_over_tokens, text_token_features, token_features, token_spans,
    word_surprisal_bits, word_token_matrix)


def __getattr__(name):
    # The regressor pulls in flax and the checkpoint code: imported on first use.
    if name == "RegressorPredictor":
        from jaxpost.rl.gaze.regressor import RegressorPredictor

        return RegressorPredictor
    raise AttributeError(f"module 'jaxpost.rl.gaze' has no attribute {name!r}")


__all__ = [
    "FEATURES", "GazePredictor", "PsycholinguisticPredictor", "RegressorPredictor", "Word",
    "check_prediction", "check_rows", "distribute_reward", "gaze_credit", "gaze_weights",
    "letters", "load_predictor", "reading_times", "split_words", "spread_over_tokens",
    "standardize", "text_token_features", "token_features", "token_spans",
    "word_surprisal_bits", "word_token_matrix", "zipf_frequency",
]
