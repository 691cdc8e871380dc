"""GazeDistrib, the word -> token remap and the psycholinguistic predictor."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.rl import gaze
from jaxpost.tokenizer import ByteTokenizer, load_tokenizer
from tests.tokenizer_testing import make_hf_tokenizer_dir, make_sentencepiece_model


# ------------------------------------------------------------------------ distribute_reward
class DistributeRewardTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_paper_example(self):
        # ALGORITHMS.md 2.2: R = 2, t = (1, 0, 2) -> (0.489, 0.180, 1.330).
        fn = self.variant(gaze.distribute_reward)
        out = fn(jnp.array([2.0]), jnp.array([[1.0, 0.0, 2.0]]), jnp.ones((1, 3)))
        chex.assert_shape(out, (1, 3))
        chex.assert_trees_all_close(out, jnp.array([[0.48946, 0.18006, 1.33048]]), atol=1e-4)
        chex.assert_trees_all_close(out.sum(), jnp.float32(2.0), atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_padding_zero_and_rows_sum_to_reward(self):
        rng = np.random.default_rng(0)
        t = rng.normal(size=(4, 6)).astype(np.float32) * 3
        t[:, 3:] = 1e6  # huge values on padding must not leak into the softmax
        mask = np.array([[1, 1, 1, 0, 0, 0]] * 2 + [[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]],
                        np.float32)
        r = np.array([1.5, -2.0, 3.0, 0.0], np.float32)
        out = np.asarray(self.variant(gaze.distribute_reward)(r, t, mask))
        assert np.all(out[mask == 0] == 0)
        np.testing.assert_allclose(out.sum(1), r, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out[3], 0.0)  # R = 0 gives zeros
        assert np.all(out[1][:3] < 0)  # negative R spread with the same weights
        # NumPy reference softmax over the valid tokens.
        e = np.exp(t[0, :3] - t[0, :3].max())
        np.testing.assert_allclose(out[0, :3], 1.5 * e / e.sum(), rtol=1e-5)

    def test_temperature_standardize_and_mix(self):
        t = np.array([[100.0, 300.0, 200.0, 0.0]], np.float32)
        mask = np.array([[1, 1, 1, 0]], np.float32)
        hot = gaze.distribute_reward(np.ones(1), t, mask, temperature=1.0)
        np.testing.assert_allclose(hot[0, :3], [0, 1, 0], atol=1e-6)  # raw ms: one-hot
        std = gaze.distribute_reward(np.ones(1), t, mask, standardize_times=True)
        z = (t[0, :3] - t[0, :3].mean()) / t[0, :3].std()
        np.testing.assert_allclose(std[0, :3], np.exp(z) / np.exp(z).sum(), rtol=1e-5)
        # Standardised times ignore affine changes of units.
        std2 = gaze.distribute_reward(np.ones(1), t * 0.001 + 7, mask, standardize_times=True)
        np.testing.assert_allclose(std2, std, rtol=1e-4)
        # mix = 0: everything on the last valid token; mix = 0.25 interpolates.
        term = gaze.distribute_reward(np.array([2.0]), t, mask, mix=0.0)
        np.testing.assert_allclose(term, [[0, 0, 2, 0]], atol=1e-6)
        part = gaze.distribute_reward(np.array([2.0]), t, mask, standardize_times=True, mix=0.25)
        np.testing.assert_allclose(part, 0.25 * 2 * np.asarray(std) + 0.75 * np.asarray(term),
                                   rtol=1e-5)

    def test_row_without_valid_token_is_an_error_naming_it(self):
        mask = np.array([[1, 1], [0, 0], [1, 0]], np.float32)
        with pytest.raises(ValueError, match="row 1 has no valid token"):
            gaze.distribute_reward(np.ones(3), np.zeros((3, 2)), mask)
        with pytest.raises(ValueError, match="temperature"):
            gaze.distribute_reward(np.ones(1), np.zeros((1, 2)), np.ones((1, 2)), 0.0)
        with pytest.raises(ValueError, match="mix"):
            gaze.distribute_reward(np.ones(1), np.zeros((1, 2)), np.ones((1, 2)), mix=1.5)


# ------------------------------------------------------------------------------ remap
class IndexPredictor:
    """Word w_i -> TRT i + 1 and FFD 10 (i + 1): easy to check sums against."""

    features = ("TRT", "FFD")

    def __init__(self):
        self.seen: list[list[str]] = []

    def predict_words(self, words):
        self.seen.append(list(words))
        v = np.arange(1, len(words) + 1, dtype=np.float32)
        return {"TRT": v, "FFD": 10 * v}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {"byte": ByteTokenizer(),
            "hf": load_tokenizer(make_hf_tokenizer_dir(tmp_path_factory.mktemp("hf"))),
            "sp": load_tokenizer(make_sentencepiece_model(tmp_path_factory.mktemp("sp")))}


def _word_totals(text, offsets, keep, values):
    """Independent check: per word, the sum of token values over tokens whose span
    (whitespace trimmed) lies inside the word."""
    totals = []
    for w in gaze.split_words(text):
        tot = 0.0
        for (s, e), k, v in zip(offsets, keep, values):
            piece = text[s:e]
            s2, e2 = s + len(piece) - len(piece.lstrip()), e - (len(piece) - len(piece.rstrip()))
            if k and s2 < e2 and s2 < w.end and e2 > w.start:
                tot += v
        totals.append(tot)
    return np.array(totals)


@pytest.mark.parametrize("kind", ["byte", "hf", "sp"])
def test_remap_conserves_word_totals_and_skips_special_tokens(tokenizers, kind):
    tok = tokenizers[kind]
    special = {"byte": ("<bos>", "<eos>"), "hf": ("<|im_start|>", "<|im_end|>"),
               "sp": ("<s>", "</s>")}[kind]
    text = f"{special[0]}the quick brown fox, naïve café jumps!{special[1]}"
    pred = IndexPredictor()
    ids, feats = gaze.text_token_features(pred, tok, text, ("TRT", "FFD"))
    assert pred.seen[-1] == ["the", "quick", "brown", "fox,", "naïve", "café", "jumps!"]
    chex.assert_shape([feats["TRT"], feats["FFD"]], (len(ids),))
    keep = np.array([i not in tok.special_ids for i in ids])
    assert (~keep).sum() == 2  # both special strings became special ids
    np.testing.assert_array_equal(feats["TRT"][~keep], 0.0)
    _, offsets = tok.encode_with_offsets(text)
    words = gaze.split_words(text.replace(special[0], " " * len(special[0])))
    totals = _word_totals(text, offsets, keep, feats["TRT"])
    np.testing.assert_allclose(totals, np.arange(1, len(words) + 1), rtol=1e-5)
    np.testing.assert_allclose(feats["FFD"], 10 * feats["TRT"], rtol=1e-6)
    # Each word's value is split evenly: tokens of one word carry equal values.
    matrix = gaze.word_token_matrix(text, words, offsets, keep)
    for col in matrix.T:
        nz = col[col > 0]
        np.testing.assert_allclose(nz, nz[0])
    # The same values from the ids alone (sampled completions).
    np.testing.assert_allclose(gaze.token_features(pred, tok, ids)["TRT"], feats["TRT"],
                               rtol=1e-6)


@pytest.mark.parametrize("kind", ["hf", "sp"])
def test_remap_of_non_canonical_ids_conserves_totals(tokenizers, kind):
    # Sampled ids need not be the canonical encoding of their text: spell it with
    # one-character tokens, so re-encoding the decoded text gives other ids.
    tok = tokenizers[kind]
    text = "hello world what"
    if kind == "hf":
        ids = [i for ch in text for i in tok.encode(ch)]
    else:  # sentencepiece would prefix every separately encoded character with "▁"
        ids = [tok._sp.piece_to_id("▁" if ch == " " else ch) for ch in " " + text]
    ids.append(tok.eos_id)
    assert tok.encode(tok.decode(ids, skip_special_tokens=True)) != ids[:-1]
    pred = IndexPredictor()
    trt = gaze.token_features(pred, tok, ids)["TRT"]
    assert pred.seen[-1] == ["hello", "world", "what"]
    assert trt[-1] == 0.0
    np.testing.assert_allclose(trt.sum(), 1 + 2 + 3, rtol=1e-5)


def test_word_surprisal_sums_token_logprobs_in_bits():
    text = "ab cd"
    words = gaze.split_words(text)
    matrix = gaze.word_token_matrix(text, words, [(0, 1), (1, 2), (2, 3), (3, 5)])
    bits = gaze.word_surprisal_bits(matrix, np.log([0.5, 0.25, 0.9, 0.125]))
    np.testing.assert_allclose(bits, [3.0, 3.0], rtol=1e-5)


# ----------------------------------------------------------------------- psycholinguistic
def test_psycholinguistic_reads_long_rare_word_longer():
    p = gaze.PsycholinguisticPredictor()
    assert isinstance(p, gaze.GazePredictor)
    out = p.predict_words(["the", "antidisestablishmentarianism", "of", "quixotic", "house"])
    chex.assert_shape(out["TRT"], (5,))
    trt = out["TRT"]
    assert trt[1] > trt[0] + 300 and trt[3] > trt[4] > trt[2]
    # Punctuation is not read as letters; surprisal adds time (3 ms per bit by default).
    np.testing.assert_allclose(p.predict_words(["house."])["TRT"], trt[4:5])
    surprised = p.predict_words(["house"], surprisal_bits=[10.0])["TRT"]
    np.testing.assert_allclose(surprised - trt[4], 30.0, rtol=1e-5)
    with pytest.raises(ValueError, match="one value per word"):
        p.predict_words(["a", "b"], surprisal_bits=[1.0])


def test_gaze_credit_weights_rows_and_prefers_content_words():
    tok = ByteTokenizer()
    texts = ["the extraordinary tapestry", "a cat"]
    rows = [tok.encode(t) + [tok.eos_id] for t in texts]
    width = max(map(len, rows))
    ids = np.full((3, width), tok.pad_id, np.int32)
    mask = np.zeros((3, width), np.float32)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1.0
    fn = gaze.gaze_credit()
    w = fn(completion_ids=ids, mask=mask, tokenizer=tok, logprobs=np.zeros(ids.shape),
           prompts=["p"] * 3, completions=texts + [""])
    chex.assert_shape(w, ids.shape)
    np.testing.assert_allclose(w[:2].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(w[2], 0.0)  # a row with no tokens (masked out)
    assert np.all(w[mask == 0] == 0)
    first = w[0, :len(rows[0])]
    # Per token, "extraordinary" (rare, long) outweighs "the"; EOS keeps a small weight.
    assert first[5] > first[0] and 0 < first[-1] < first[5]

