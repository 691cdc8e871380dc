"""Eye-tracking corpora as CSV: reading, a deterministic synthetic corpus, and batches.

Layout (the one-row-per-word layout of the public corpora, e.g. the CMCL 2021 shared
task's ZuCo files `sentence_id,word_id,word,nFix,FFD,GPT,TRT,fixProp`; GECO and Provo
exports are converted to it by renaming columns): a header, then one row per word with
`sentence_id`, `word_id` (position in the sentence), `word`, and one column per feature
(any of `jaxpost.rl.gaze.FEATURES`; `TRT` required). Rows may come in any order; a
sentence is its rows sorted by `word_id`.

Batches for the regressor (`EyeTrackingBatches`): each sentence's words are joined by
spaces and encoded with the tokenizer's offsets; a token belongs to the first word it
covers (`token_word`, -1 for none). Targets are standardised with the training
sentences' mean and std per feature.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence

import numpy as np

FEATURES = ("nFix", "FFD", "GPT", "TRT", "fixProp")
REQUIRED_COLUMNS = ("sentence_id", "word_id", "word")

#: The committed synthetic corpus (`write_synthetic_csv(SYNTHETIC_CSV)` reproduces it).
SYNTHETIC_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "eye_tracking_synthetic.csv")


@dataclasses.dataclass(frozen=True)
class Sentence:
    """One sentence: its words and `targets[W, k]` (the corpus's `features`, in order)."""

    sentence_id: str
    words: tuple[str, ...]
    targets: np.ndarray


@dataclasses.dataclass(frozen=True)
class Corpus:
    features: tuple[str, ...]
    sentences: tuple[Sentence, ...]

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std (floored at 1e-6) of each feature over all words."""
        values = np.concatenate([s.targets for s in self.sentences], axis=0)
        return values.mean(0), np.maximum(values.std(0), 1e-6)


def read_eye_tracking_csv(path: str | os.PathLike,
                          features: Sequence[str] | None = None) -> Corpus:
    """Reads a word-per-row eye-tracking CSV (see the module docstring).

    Args:
        path: the CSV file.
        features: which feature columns to use (default: every one of `FEATURES` the
            file has, in `FEATURES` order).

    Raises:
        ValueError: naming the file (and line) on a missing column, a missing `TRT`, an
            unknown feature, a non-numeric value, or a repeated (sentence_id, word_id).
    """
    path = os.fspath(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; an eye-tracking CSV needs "
                             f"{REQUIRED_COLUMNS} and feature columns among {FEATURES}")
        if features is None:
            features = tuple(c for c in FEATURES if c in header)
        features = tuple(features)
        unknown = [c for c in features if c not in FEATURES]
        if unknown:
            raise ValueError(f"{path}: unknown features {unknown}; expected some of {FEATURES}")
        absent = [c for c in features if c not in header]
        if "TRT" not in features or absent:
            raise ValueError(f"{path}: feature columns {absent or ['TRT']} are missing "
                             f"(columns: {header}); TRT is required")
        rows: dict[str, dict[int, tuple[str, list[float]]]] = {}
        order: list[str] = []
        for line, row in enumerate(reader, start=2):
            sid = row["sentence_id"]
            try:
                wid = int(float(row["word_id"]))
                values = [float(row[c]) for c in features]
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: word_id and {list(features)} must be "
                                 f"numbers, got {dict(row)}") from None
            if not all(np.isfinite(values)):
                raise ValueError(f"{path}:{line}: non-finite feature value in {dict(row)}")
            word = (row["word"] or "").strip()
            if not word or any(ch.isspace() for ch in word):
                raise ValueError(f"{path}:{line}: word {row['word']!r} must be non-empty "
                                 "and contain no whitespace")
            if sid not in rows:
                rows[sid] = {}
                order.append(sid)
            if wid in rows[sid]:
                raise ValueError(f"{path}:{line}: sentence {sid!r} has word_id {wid} twice")
            rows[sid][wid] = (word, values)
    if not order:
        raise ValueError(f"{path}: no rows")
    sentences = []
    for sid in order:
        items = [rows[sid][k] for k in sorted(rows[sid])]
        sentences.append(Sentence(sid, tuple(w for w, _ in items),
                                  np.array([v for _, v in items], np.float32)))
    return Corpus(features, tuple(sentences))


# ------------------------------------------------------------------------------ synthetic
_SYLLABLES = ("ka", "lo", "mi", "ten", "sor", "a", "be", "dru", "ple", "xu", "ran", "vi",
              "ost", "pe", "gla", "mun", "e", "tor", "si", "fen")


def synthetic_eye_tracking_rows(num_sentences: int = 160, seed: int = 0) -> list[dict]:
    """A deterministic synthetic corpus in the CSV layout, with known structure.

    A lexicon of 160 pseudo-words (1-4 syllables) has Zipfian frequencies that fall
    with length; sentences draw 5-10 words from it. Features follow the reading-time
    literature's directions (longer and rarer words are read longer; the previous word's
    length spills over), plus noise:
    `TRT = 120 + 22 * len + 28 * log2(rank + 1) + 4 * prev_len + N(0, 15^2)` (ms), and
    FFD, GPT, nFix, fixProp derived from it (see the code). A regressor over subword
    tokens can learn it from the spelling and the neighbours.
    """
    rng = np.random.default_rng([seed, 0x67617A65])
    lexicon: list[str] = []
    while len(lexicon) < 160:
        n = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.35, 0.25, 0.15]))
        w = "".join(rng.choice(_SYLLABLES, n))
        if w not in lexicon:
            lexicon.append(w)
    # Frequency rank: mostly by length (short = frequent), with noise.
    keys = np.array([len(w) + rng.normal(0, 1.5) for w in lexicon])
    lexicon = [lexicon[i] for i in np.argsort(keys, kind="stable")]
    probs = 1.0 / np.arange(1, len(lexicon) + 1)
    probs /= probs.sum()
    out = []
    for s in range(num_sentences):
        n = int(rng.integers(5, 11))
        ranks = rng.choice(len(lexicon), n, p=probs)
        prev = 0
        for i, r in enumerate(ranks):
            w = lexicon[int(r)]
            length = len(w)
            trt = 120 + 22 * length + 28 * np.log2(r + 2) + 4 * prev + rng.normal(0, 15)
            trt = max(trt, 60.0)
            ffd = max(0.55 * trt + rng.normal(0, 10), 50.0)
            gpt = trt + max(rng.normal(20, 15), 0.0)
            nfix = max(trt / 190 + rng.normal(0, 0.1), 0.5)
            fixprop = 1 / (1 + np.exp(-(length - 3 + 0.5 * np.log2(r + 2) - 2) / 1.5))
            out.append({"sentence_id": f"s{s:04d}", "word_id": i,
                        "word": w if i < n - 1 else w + ".",
                        "nFix": round(nfix, 3), "FFD": round(ffd, 1), "GPT": round(gpt, 1),
                        "TRT": round(trt, 1), "fixProp": round(float(fixprop), 3)})
            prev = length
    return out


def write_synthetic_csv(path: str | os.PathLike, num_sentences: int = 160, seed: int = 0) -> str:
    """Writes `synthetic_eye_tracking_rows(num_sentences, seed)` as a CSV; returns the path."""
    rows = synthetic_eye_tracking_rows(num_sentences, seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(REQUIRED_COLUMNS + FEATURES),
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return os.fspath(path)


# -------------------------------------------------------------------------------- batches
def token_word_index(tokenizer, words: Sequence[str]) -> tuple[list[int], list[int]]:
    """Ids of `" ".join(words)` and, per token, the index of the first word it covers
    (-1 for tokens covering only whitespace, or special tokens)."""
    text = " ".join(words)
    ids, offsets = tokenizer.encode_with_offsets(text)
    bounds, pos = [], 0
    for w in words:
        bounds.append((pos, pos + len(w)))
        pos += len(w) + 1
    special = tokenizer.special_ids
    index = []
    for i, (s, e) in zip(ids, offsets):
        hit = -1
        if i not in special:
            for k, (ws, we) in enumerate(bounds):
                if ws < e and we > s:
                    hit = k
                    break
        index.append(hit)
    return list(ids), index


def encode_sentence(tokenizer, words: Sequence[str], max_tokens: int, max_words: int
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """`(tokens [max_tokens], token_word [max_tokens], num_words)`: a sentence cut to the
    words whose tokens fit (at most `max_words`); padding has token_word -1."""
    ids, index = token_word_index(tokenizer, words)
    tokens = np.full((max_tokens,), tokenizer.pad_id, np.int32)
    tw = np.full((max_tokens,), -1, np.int32)
    n = min(len(ids), max_tokens)
    tokens[:n], tw[:n] = ids[:n], index[:n]
    # Words cut by the token limit (or beyond max_words) are dropped whole.
    last_full = max_words
    if len(ids) > max_tokens:
        last_full = min(last_full, index[max_tokens] if index[max_tokens] >= 0 else
                        max(index[:max_tokens]) + 1)
    tw[tw >= last_full] = -1
    return tokens, tw, int(min(last_full, len(words)))


@dataclasses.dataclass
class EyeTrackingBatches:
    """Shuffled epochs of sentences as batches of `tokens`, `token_word`, `targets`,
    `word_mask`; resumable (`get_state` / `set_state`)."""

    sentences: Sequence[Sentence]
    tokenizer: object
    mean: np.ndarray
    std: np.ndarray
    batch_size: int
    max_tokens: int = 96
    max_words: int = 24
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        if not self.sentences:
            raise ValueError("no sentences to batch")
        self.epoch, self.position = 0, 0
        self._encoded = [self.encode(s) for s in self.sentences]

    def encode(self, s: Sentence) -> dict[str, np.ndarray]:
        tokens, tw, n = encode_sentence(self.tokenizer, s.words, self.max_tokens, self.max_words)
        k = s.targets.shape[1]
        targets = np.zeros((self.max_words, k), np.float32)
        mask = np.zeros((self.max_words,), np.float32)
        targets[:n] = (s.targets[:n] - self.mean) / self.std
        mask[:n] = 1.0
        return {"tokens": tokens, "token_word": tw, "targets": targets, "word_mask": mask}

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self._encoded)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        while len(rows) < self.batch_size:
            order = self._order(self.epoch)
            rows.append(self._encoded[int(order[self.position])])
            self.position += 1
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def batches(self) -> list[dict[str, np.ndarray]]:
        """All sentences once, in order, in batches (the last one padded with
        `word_mask` 0 rows): for evaluation."""
        out = []
        for i in range(0, len(self._encoded), self.batch_size):
            rows = self._encoded[i:i + self.batch_size]
            pad = {k: np.zeros_like(v) for k, v in rows[0].items()}
            pad["token_word"] = np.full_like(rows[0]["token_word"], -1)
            rows = rows + [pad] * (self.batch_size - len(rows))
            out.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def split_sentences(corpus: Corpus, heldout_fraction: float) -> tuple[list, list]:
    """(train, heldout) sentences: a fixed, seed-independent choice of every
    round(1/fraction)-th sentence in file order goes to held-out."""
    if not 0.0 < heldout_fraction < 1.0:
        return list(corpus.sentences), []
    every = max(2, round(1.0 / heldout_fraction))
    train = [s for i, s in enumerate(corpus.sentences) if i % every != every - 1]
    held = [s for i, s in enumerate(corpus.sentences) if i % every == every - 1]
    return train, held


__all__ = [
    "FEATURES",
    "REQUIRED_COLUMNS",
    "SYNTHETIC_CSV",
    "Corpus",
    "EyeTrackingBatches",
    "Sentence",
    "encode_sentence",
    "read_eye_tracking_csv",
    "split_sentences",
    "synthetic_eye_tracking_rows",
    "token_word_index",
    "write_synthetic_csv",
]
