"""A tiny fake gaze predictor for GazeReward tests (no eye-tracking data, no wordfreq)."""

from __future__ import annotations

import numpy as np


def fake_trt(token_id: int) -> float:
    """The fake reading time of one (non-special) token: 1 + (id mod 7) / 7."""
    return 1.0 + (token_id % 7) / 7.0


class FakeTokenGaze:
    """Token-level predictor: `TRT` of each token of `tokenizer.encode(text)` is
    `fake_trt(id)` (0 on special tokens); `FFD` is half of it."""

    def __repr__(self) -> str:
        return "FakeTokenGaze()"

    def token_features(self, tokenizer, text: str) -> dict[str, np.ndarray]:
        ids = tokenizer.encode(text)
        special = getattr(tokenizer, "special_ids", None)
        if special is None:
            special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
        trt = np.array([0.0 if i in special or tokenizer.id_to_token(i).startswith("<|")
                        else fake_trt(i) for i in ids], np.float32)
        return {"TRT": trt, "FFD": trt / 2}
