"""Gaze predictors: words in, predicted eye-tracking features per word out.

One interface (the public contract): `predict_words(words: list[str]) -> dict[str,
np.ndarray]`, feature name -> one float per word, with `TRT` (total reading time, ms)
always present. The feature names are those of the CMCL 2021 shared task / ZuCo
(`FEATURES`): nFix (number of fixations), FFD (first fixation duration), GPT (go-past
time), TRT (total reading time), fixProp (fraction of readers who fixated the word).

Two predictors: `PsycholinguisticPredictor` (here; needs no eye-tracking data) and the
trained BiLSTM regressor (`jaxpost.rl.gaze.regressor.RegressorPredictor`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

#: Eye-tracking features, in the order of the CMCL 2021 shared task (ZuCo) files.
FEATURES = ("nFix", "FFD", "GPT", "TRT", "fixProp")


@runtime_checkable
class GazePredictor(Protocol):
    """What a gaze predictor provides."""

    #: The features `predict_words` returns (a subset of `FEATURES`, `"TRT"` included).
    features: tuple[str, ...]

    def predict_words(self, words: list[str]) -> dict[str, np.ndarray]:
        """Feature name -> float array `[len(words)]` of predictions, `TRT` included."""


def check_prediction(pred: dict[str, np.ndarray], num_words: int, where: str) -> None:
    """Raises ValueError unless `pred` has `TRT` and one finite value per word for every
    feature (`where` names the predictor in the message)."""
    if "TRT" not in pred:
        raise ValueError(f"{where}.predict_words returned {sorted(pred)}; `TRT` must be present")
    for name, values in pred.items():
        if np.shape(values) != (num_words,):
            raise ValueError(f"{where}.predict_words: feature {name!r} has shape "
                             f"{np.shape(values)}, expected ({num_words},)")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{where}.predict_words: feature {name!r} has non-finite values")


_LETTERS = re.compile(r"[^\W_]", re.UNICODE)  # letters and digits
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$", re.UNICODE)


def letters(word: str) -> int:
    """Letters and digits in `word` (what word-length effects count; punctuation not)."""
    return len(_LETTERS.findall(word))


@functools.lru_cache(maxsize=1 << 16)
def zipf_frequency(word: str, lang: str = "en") -> float:
    """Zipf frequency (log10 occurrences per billion words; 0 when unknown) of a word,
    leading/trailing punctuation stripped, from `wordfreq`'s bundled (offline) lists."""
    import wordfreq

    core = _EDGE_PUNCT.sub("", word)
    return float(wordfreq.zipf_frequency(core, lang)) if core else 0.0


class PsycholinguisticPredictor:
    """Reading time from word length, word frequency and (optionally) surprisal.

    `TRT(ms) = max(0, b0 + b_len * (letters - 5) + b_freq * (4.5 - zipf) + b_surp * bits)`

    How the coefficients were chosen (honestly): they are round figures of the size the
    reading literature reports, not fitted by us and not re-checked against the papers
    in this session. Length and frequency: Just & Carpenter (1980, Psychological Review
    87(4), "A theory of reading"), whose regression of gaze duration on word properties
    we recall as about 32 ms per letter and about 53 ms per log unit of word frequency
    (the same direction and order as Rayner 1998's review, Psychological Bulletin 124(3),
    and Kliegl et al. 2004's length and frequency effects). Surprisal: Smith & Levy
    (2013, Cognition 128(3), "The effect of word predictability on reading time is
    logarithmic") find reading time linear in surprisal, a few ms per bit; we take 3.
    `b0 = 250` ms is a typical total reading time of a fixated content word; the
    reference points 5 letters and Zipf 4.5 are mid-range English values. Since
    GazeDistrib normalises the times within each completion (softmax, usually after
    standardising), what matters is the ratio of the effects, not their absolute size.
    The floor at 0 stands for skipped words (short frequent words often are).

    Args:
        lang: wordfreq language code.
        intercept_ms, length_ms, frequency_ms, surprisal_ms: b0, b_len, b_freq, b_surp.
    """

    features = ("TRT",)

    def __init__(self, lang: str = "en", *, intercept_ms: float = 250.0,
                 length_ms: float = 32.0, frequency_ms: float = 53.0,
                 surprisal_ms: float = 3.0):
        self.lang = lang
        self.intercept_ms, self.length_ms = float(intercept_ms), float(length_ms)
        self.frequency_ms, self.surprisal_ms = float(frequency_ms), float(surprisal_ms)

    def __repr__(self) -> str:
        return (f"PsycholinguisticPredictor(lang={self.lang!r}, intercept_ms="
                f"{self.intercept_ms}, length_ms={self.length_ms}, frequency_ms="
                f"{self.frequency_ms}, surprisal_ms={self.surprisal_ms})")

    def predict_words(self, words: Sequence[str],
                      surprisal_bits: Sequence[float] | None = None) -> dict[str, np.ndarray]:
        """`{"TRT": [len(words)]}` in ms.

        Args:
            words: whitespace-free words (punctuation attached is fine: it is not counted).
            surprisal_bits: optional `-log2 p(word | context)` per word (e.g. the
                reference policy's token log-probs summed over each word, over ln 2;
                see `jaxpost.rl.gaze.word_surprisal_bits`).
        """
        n = len(words)
        length = np.array([letters(w) for w in words], np.float64)
        zipf = np.array([zipf_frequency(w, self.lang) for w in words], np.float64)
        trt = (self.intercept_ms + self.length_ms * (length - 5.0)
               + self.frequency_ms * (4.5 - zipf))
        if surprisal_bits is not None:
            bits = np.asarray(surprisal_bits, np.float64)
            if bits.shape != (n,):
                raise ValueError(f"surprisal_bits has shape {bits.shape}; expected ({n},), "
                                 "one value per word")
            trt = trt + self.surprisal_ms * bits
        return {"TRT": np.maximum(trt, 0.0).astype(np.float32)}


#: ln(2): nats -> bits.
LN2 = math.log(2.0)

__all__ = ["FEATURES", "GazePredictor", "PsycholinguisticPredictor", "check_prediction",
           "letters", "zipf_frequency"]
