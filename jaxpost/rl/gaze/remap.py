"""Words <-> tokens: gaze features predicted per word, placed on a tokenizer's tokens.

The rule (eyetrackpy's ET1 remap, ALGORITHMS.md 2.1): a word's value is split evenly
over the tokens that cover it, so each word's total is conserved; special tokens (BOS,
EOS, pad, chat-template markers) and tokens holding only whitespace get nothing. Which
token covers which word comes from the tokenizer's character offsets
(`Tokenizer.encode_with_offsets`), so the same code serves the byte-level, Hugging Face
and sentencepiece tokenizers.

A word is a maximal run of non-whitespace characters (`split_words`), as in the
eye-tracking corpora (ZuCo, GECO, Provo), where punctuation stays attached to its word.

Entry points:
- `text_token_features(predictor, tokenizer, text)`: encode a text and give each token
  its share of the features (reward models scoring text: GazeReward).
- `token_features(predictor, tokenizer, ids)`: the same for given token ids (sampled
  completions, which need not be the tokenizer's canonical encoding of their text).
- `token_spans`, `word_token_matrix`, `spread_over_tokens`: the pieces.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from jaxpost.rl.gaze.predictors import LN2, GazePredictor, check_prediction

_WORD = re.compile(r"\S+")


@dataclasses.dataclass(frozen=True)
class Word:
    """A word of a text and its character span `[start, end)`."""

    text: str
    start: int
    end: int


def split_words(text: str) -> list[Word]:
    """The whitespace-separated words of `text` with their character spans."""
    return [Word(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def word_token_matrix(text: str, words: Sequence[Word], offsets: Sequence[tuple[int, int]],
                      keep: Sequence[bool] | None = None) -> np.ndarray:
    """`A[T, W]`: `A[t, w] = 1 / (tokens covering w)` if token t covers a non-whitespace
    character of word w (and `keep[t]`), else 0.

    Every column of a word that some kept token covers sums to 1, so `A @ values`
    conserves each word's value. A token spanning two words (rare; no whitespace
    pre-tokenizer merges across a space) takes a share of both.
    """
    t_count, w_count = len(offsets), len(words)
    a = np.zeros((t_count, w_count), np.float64)
    if not t_count or not w_count:
        return a.astype(np.float32)
    starts = np.array([w.start for w in words])
    ends = np.array([w.end for w in words])
    for t, (s, e) in enumerate(offsets):
        if (keep is not None and not keep[t]) or e <= s:
            continue
        piece = text[s:e]
        lead = len(piece) - len(piece.lstrip())
        trail = len(piece) - len(piece.rstrip())
        s, e = s + lead, e - trail
        if e <= s:
            continue  # whitespace only
        a[t, (starts < e) & (ends > s)] = 1.0
    counts = a.sum(axis=0, keepdims=True)
    return (a / np.where(counts > 0, counts, 1.0)).astype(np.float32)


def spread_over_tokens(matrix: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Word values `[W]` (or `[W, k]`) -> token values `[T]` (or `[T, k]`): `matrix @ values`."""
    return (matrix @ np.asarray(values, np.float32)).astype(np.float32)


def token_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]], np.ndarray]:
    """The text of `ids`, each token's character span in it, and which tokens are kept.

    The text is `decode` of the non-special ids (special tokens keep an empty span and
    `keep[t] = False`). Spans come from `encode_with_offsets(text)` when it gives back
    exactly these ids (the usual case); otherwise (a sampled, non-canonical tokenization)
    from decoding growing prefixes, each token spanning the characters it added.
    """
    ids = [int(i) for i in ids]
    special = tokenizer.special_ids
    keep = np.array([i not in special for i in ids], bool)
    kept = [i for i, k in zip(ids, keep) if k]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    enc_ids, enc_offsets = tokenizer.encode_with_offsets(text)
    if list(enc_ids) == kept:
        kept_spans = [tuple(o) for o in enc_offsets]
    else:
        kept_spans, prev = [], 0
        for k in range(1, len(kept) + 1):
            cur = len(tokenizer.decode(kept[:k], skip_special_tokens=True))
            cur = max(prev, min(cur, len(text)))
            kept_spans.append((prev, cur))
            prev = cur
    spans: list[tuple[int, int]] = []
    it = iter(kept_spans)
    for k in keep:
        spans.append(next(it) if k else (0, 0))
    return text, spans, keep


def word_surprisal_bits(matrix: np.ndarray, token_logprobs: np.ndarray) -> np.ndarray:
    """Per-word surprisal in bits from per-token log-probs (nats): the sum over the tokens
    covering each word (`-logp` of a token shared by two words is split between them)."""
    covered = (matrix > 0).astype(np.float32)
    share = covered / np.maximum(covered.sum(axis=1, keepdims=True), 1.0)
    return (share.T @ (-np.asarray(token_logprobs, np.float32))) / LN2


def _features_on_tokens(predictor: GazePredictor, text: str, spans, keep,
                        features: Sequence[str] | None, token_logprobs=None
                        ) -> dict[str, np.ndarray]:
    # Special-token strings in the text (a rendered chat template) are not words.
    chars = list(text)
    for (s, e), k in zip(spans, keep):
        if not k:
            chars[s:e] = " " * (e - s)
    text = "".join(chars)
    words = split_words(text)
    matrix = word_token_matrix(text, words, spans, keep)
    names = tuple(features or ("TRT",))
    if not words:
        return {f: np.zeros(len(spans), np.float32) for f in names}
    kwargs = {}
    if token_logprobs is not None:
        lp = np.where(keep, np.asarray(token_logprobs, np.float32), 0.0)
        kwargs["surprisal_bits"] = word_surprisal_bits(matrix, lp)
    pred = predictor.predict_words([w.text for w in words], **kwargs)
    check_prediction(pred, len(words), type(predictor).__name__)
    missing = [f for f in names if f not in pred]
    if missing:
        raise ValueError(f"{type(predictor).__name__} predicts {sorted(pred)}, not {missing}")
    return {f: spread_over_tokens(matrix, pred[f]) for f in names}


def text_token_features(predictor: GazePredictor, tokenizer, text: str,
                        features: Sequence[str] | None = None
                        ) -> tuple[list[int], dict[str, np.ndarray]]:
    """`encode(text)` and the predicted features of each of its tokens.

    Returns `(ids, {feature: [len(ids)]})`, features default `("TRT",)`; special-token
    strings in the text (a rendered chat template) become special ids and get 0.
    """
    ids, offsets = tokenizer.encode_with_offsets(text)
    special = tokenizer.special_ids
    keep = np.array([i not in special for i in ids], bool)
    return list(ids), _features_on_tokens(predictor, text, offsets, keep, features)


def token_features(predictor: GazePredictor, tokenizer, ids: Sequence[int],
                   features: Sequence[str] | None = None, token_logprobs=None
                   ) -> dict[str, np.ndarray]:
    """Predicted features `{feature: [len(ids)]}` on the tokens `ids` (see `token_spans`).

    `token_logprobs` (nats, one per id), if given, become per-word surprisal for the
    predictor (`predict_words(words, surprisal_bits=...)`).
    """
    text, spans, keep = token_spans(tokenizer, ids)
    return _features_on_tokens(predictor, text, spans, keep, features, token_logprobs)


__all__ = ["Word", "split_words", "spread_over_tokens", "text_token_features", "token_features",
           "token_spans", "word_surprisal_bits", "word_token_matrix"]
