"""GazeDistrib as GRPO token credit: predicted reading time -> per-token weights.

Use in a GRPO recipe (`jaxpost.rl.credit` describes the interface):

    cfg.token_credit = "jaxpost.rl.gaze:gaze_credit(standardize=True)"
    cfg.token_credit_mode = "weighted"       # or "reward_to_go"

Each completion's words get predicted reading times (`predictor`), the remap puts them on
the policy's tokens (special tokens, EOS included, get 0 ms), and the weights are
GazeDistrib's softmax over the completion's tokens (`gaze_weights`: temperature,
optional standardisation, optional terminal mix). Special tokens stay in the softmax
with their 0 ms, so EOS keeps a small weight and the policy still learns when to stop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxpost.rl.gaze.distrib import gaze_weights
from jaxpost.rl.gaze.predictors import GazePredictor, PsycholinguisticPredictor
from jaxpost.rl.gaze.remap import token_features


def load_predictor(spec: str | GazePredictor) -> GazePredictor:
    """`"psycholinguistic"`, `"regressor:WORKDIR"` (a trained `gaze_predictor` run), or a
    predictor object (returned as is)."""
    if not isinstance(spec, str):
        return spec
    if spec == "psycholinguistic":
        return PsycholinguisticPredictor()
    if spec.startswith("regressor:"):
        from jaxpost.rl.gaze.regressor import RegressorPredictor

        return RegressorPredictor.from_workdir(spec[len("regressor:"):])
    raise ValueError(f"gaze predictor {spec!r}: expected 'psycholinguistic' or "
                     "'regressor:WORKDIR'")


def reading_times(predictor: GazePredictor, tokenizer, completion_ids: np.ndarray,
                  mask: np.ndarray, feature: str = "TRT",
                  logprobs: np.ndarray | None = None) -> np.ndarray:
    """Predicted `feature` per completion token, `[N, T]` (0 on padding)."""
    ids = np.asarray(completion_ids)
    m = np.asarray(mask) > 0
    out = np.zeros(ids.shape, np.float32)
    for i in range(ids.shape[0]):
        cols = np.flatnonzero(m[i])
        if not cols.size:
            continue
        lp = None if logprobs is None else np.asarray(logprobs)[i, cols]
        out[i, cols] = token_features(predictor, tokenizer, ids[i, cols], (feature,),
                                      token_logprobs=lp)[feature]
    return out


def gaze_credit(predictor: str = "psycholinguistic", feature: str = "TRT",
                temperature: float = 1.0, standardize: bool = True, mix: float = 1.0,
                surprisal: bool = False):
    """A token-credit function (`jaxpost.rl.credit.TokenCreditFn`) of GazeDistrib weights.

    Args:
        predictor: see `load_predictor`.
        feature: the predicted feature used as reading time t.
        temperature: softmax temperature over t (1: the paper's).
        standardize: standardise t within each completion first ([U]; recommended, since
            raw milliseconds would make the softmax one-hot).
        mix: fraction spread by gaze; the rest goes to the last token (1: the paper's).
        surprisal: pass the sampling policy's log-probs to the predictor as per-word
            surprisal (only `PsycholinguisticPredictor` uses it).
    """
    model = load_predictor(predictor)
    if feature not in model.features:
        raise ValueError(f"gaze_credit: feature {feature!r} is not predicted by {model!r} "
                         f"(it predicts {model.features})")

    def credit(*, completion_ids, mask, tokenizer, logprobs=None, **unused: Any) -> np.ndarray:
        del unused
        m = np.asarray(mask, np.float32)
        t = reading_times(model, tokenizer, completion_ids, m, feature,
                          logprobs if surprisal else None)
        rows = m.sum(axis=1) > 0  # masked-out rows (e.g. truncated) have no tokens
        w = np.zeros(m.shape, np.float32)
        if rows.any():
            w[rows] = np.asarray(gaze_weights(t[rows], m[rows], temperature,
                                              standardize_times=standardize, mix=mix))
        return w

    credit.__name__ = "gaze_credit"
    return credit


__all__ = ["gaze_credit", "load_predictor", "reading_times"]
