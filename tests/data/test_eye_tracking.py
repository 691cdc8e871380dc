"""Eye-tracking CSV reading, the synthetic corpus and sentence batches."""

import chex
import numpy as np
import pytest

from jaxpost.data import eye_tracking as et
from jaxpost.tokenizer import ByteTokenizer


def test_committed_synthetic_csv_is_what_the_generator_writes(tmp_path):
    path = et.write_synthetic_csv(tmp_path / "s.csv")
    with open(path) as fresh, open(et.SYNTHETIC_CSV) as committed:
        assert fresh.read() == committed.read()
    corpus = et.read_eye_tracking_csv(et.SYNTHETIC_CSV)
    assert corpus.features == et.FEATURES and len(corpus.sentences) == 160
    # Built-in structure: longer words are read longer.
    words = [w for s in corpus.sentences for w in s.words]
    trt = np.concatenate([s.targets[:, 3] for s in corpus.sentences])
    lengths = np.array([len(w.rstrip(".")) for w in words])
    assert np.corrcoef(lengths, trt)[0, 1] > 0.5


def test_csv_rows_in_any_order_and_errors_name_file_and_line(tmp_path):
    good = tmp_path / "g.csv"
    good.write_text("sentence_id,word_id,word,TRT,FFD\nb,1,cat,200,100\na,0,A,150,90\n"
                    "b,0,the,120,80\n")
    c = et.read_eye_tracking_csv(good)
    assert c.features == ("FFD", "TRT")
    assert [s.words for s in c.sentences] == [("the", "cat"), ("A",)]
    np.testing.assert_array_equal(c.sentences[0].targets, [[80, 120], [100, 200]])
    for text, match in (
            ("sentence_id,word,TRT\n", r"missing columns \['word_id'\]"),
            ("sentence_id,word_id,word,FFD\ns,0,a,1\n", r"TRT is required"),
            ("sentence_id,word_id,word,TRT\ns,0,a,1\ns,1,b,fast\n", r"bad\.csv:3: word_id"),
            ("sentence_id,word_id,word,TRT\ns,0,a,1\ns,0,b,2\n", r"bad\.csv:3: .*word_id 0 twice")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            et.read_eye_tracking_csv(bad)


def test_batches_map_tokens_to_words_and_standardise_targets():
    s = et.Sentence("s", ("the", "naïve", "cat."), np.array([[1.0], [2.0], [3.0]], np.float32))
    it = et.EyeTrackingBatches([s], ByteTokenizer(), np.array([2.0]), np.array([0.5]),
                               batch_size=2, max_tokens=8, max_words=4, shuffle=False)
    b = next(it)
    chex.assert_shape([b["tokens"], b["token_word"]], (2, 8))
    chex.assert_shape(b["targets"], (2, 4, 1))
    # "the naïve cat." in bytes: t h e _ n a ï(2 bytes) v e ...; 8 tokens cut "naïve",
    # so it is dropped whole (no target, its tokens map to no word).
    np.testing.assert_array_equal(b["token_word"][0], [0, 0, 0, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(b["word_mask"][0], [1, 0, 0, 0])
    full = et.encode_sentence(ByteTokenizer(), s.words, 16, 4)
    np.testing.assert_array_equal(full[1][:15], [0, 0, 0, -1, 1, 1, 1, 1, 1, 1, -1, 2, 2, 2, 2])
    assert full[2] == 3
    np.testing.assert_allclose(b["targets"][0, :1, 0], [-2.0])
    assert it.get_state() == {"epoch": 2, "position": 0}  # one sentence, twice per batch
