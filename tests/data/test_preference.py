"""jaxpost/data/preference.py: preference records, their token ids, resumable batches."""

import json
import re

import numpy as np
import pytest

from jaxpost.data import MalformedRecordError
from jaxpost.data.preference import (
    PreferenceBatches,
    check_preference_source,
    encode_pair,
    encode_sequence,
    open_preference_source,
    pad_sequences,
    preference_problem,
)
from jaxpost.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


# --------------------------------------------------------------------------------- text
def test_pad_sequences_truncation_keeps_the_end_or_the_start():
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8]]
    t, s, trunc = pad_sequences(seqs, 4, 0, "truncate_left")
    np.testing.assert_array_equal(t, [[3, 4, 5, 6], [7, 8, 0, 0]])
    np.testing.assert_array_equal(s, [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(trunc, [True, False])
    t, _, _ = pad_sequences(seqs, 4, 0, "truncate_right")
    np.testing.assert_array_equal(t[0], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="truncation"):
        pad_sequences(seqs, 4, 0, "middle")


def test_encode_sequence_adds_eos_once_and_keeps_template_bos():
    ids = encode_sequence(TOK, "<bos><|user|>q<|assistant|>", "a")
    assert ids[0] == TOK.bos_id and ids.count(TOK.bos_id) == 1 and ids[-1] == TOK.eos_id
    assert encode_sequence(TOK, "<bos>q", "a<eos>") == encode_sequence(TOK, "<bos>q", "a")
    plain = encode_sequence(TOK, "q", "a")  # plain text: BOS added, as the tokenizer does
    assert plain[0] == TOK.bos_id
    assert encode_sequence(TOK, "q", "a", add_eos=False)[-1] == ord("a")


# ------------------------------------------------------------------------------ records
@pytest.mark.parametrize("record, match", [
    ({"prompt": "q", "rejected": "b"}, "missing 'chosen'"),
    ({"prompt": "q", "chosen": "a"}, "missing 'rejected'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' is int"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' is int"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
     "'chosen' ends with a 'user'"),
    ({"chosen": [{"role": "assistant"}], "rejected": "b"}, r"'chosen\[0\]'"),
    (["a", "b"], "record is a list"),
])
def test_preference_problem_names_the_field(record, match):
    assert preference_problem(record) is not None
    assert re.search(match, preference_problem(record))


def test_record_formats_give_the_same_sequence():
    """Chat-message prompt, plain prompt with chat=True, and an implicit-prompt
    conversation all render as the chat template does."""
    full = TOK.encode(TOK.apply_chat_template(
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]))
    forms = [{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"},
             {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
             {"prompt": "2+2?", "chosen": [{"role": "assistant", "content": "4"}],
              "rejected": [{"role": "assistant", "content": "5"}]},
             {"chosen": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}],
              "rejected": [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "5"}]}]
    for record in forms:
        chosen, rejected = encode_pair(TOK, record, chat=True)
        assert chosen == full and rejected[:-2] == full[:-2] and rejected[-2] == ord("5")
    plain, _ = encode_pair(TOK, forms[1], chat=False)  # plain text: BOS + text + EOS
    assert plain == [TOK.bos_id] + TOK.encode("2+2?4") + [TOK.eos_id]


def test_check_preference_source_names_file_line_and_field(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    bad = {"prompt": "q", "rejected": "b"}
    path.write_text("\n".join(json.dumps(r) for r in [good, good, bad]))
    with pytest.raises(MalformedRecordError, match=r"prefs\.jsonl:3: .*missing 'chosen'"):
        check_preference_source(open_preference_source(str(path)), str(path))


# ------------------------------------------------------------------------------ batches
def _batches(**kw):
    source = open_preference_source("synthetic:addition:2", num_records=40)
    args = dict(batch_size=8, seq_len=24, seed=0)
    args.update(kw)
    return PreferenceBatches(source, np.arange(len(source)), TOK, **args)


def test_batches_are_right_padded_pairs_and_resume_exactly():
    it = _batches()
    batch = next(it)
    assert set(batch) == {"chosen_tokens", "chosen_segment_ids", "rejected_tokens",
                          "rejected_segment_ids"}
    for side in ("chosen", "rejected"):
        tokens, seg = batch[f"{side}_tokens"], batch[f"{side}_segment_ids"]
        assert tokens.shape == seg.shape == (8, 24) and tokens.dtype == np.int32
        lengths = seg.sum(1)
        np.testing.assert_array_equal(seg, np.arange(24)[None] < lengths[:, None])  # right-padded
        np.testing.assert_array_equal(tokens[np.arange(8), lengths - 1], TOK.eos_id)
        assert np.all(tokens[seg == 0] == TOK.pad_id)
    for _ in range(6):  # across an epoch boundary (40 records, 8 per batch)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["epoch"] == 1
    expected = [next(it) for _ in range(3)]
    again = _batches()
    again.set_state(state)
    for want in expected:
        got = next(again)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_epochs_visit_every_record_once_and_processes_are_disjoint():
    seen = [set(), set()]
    for p in range(2):
        it = _batches(batch_size=4, shuffle=True, process_index=p, process_count=2)
        for _ in range(5):  # one epoch of this process's 20 records
            b = next(it)
            seen[p].update(map(bytes, b["chosen_tokens"]))
        assert it.epoch == 0 and it.position == 20
    assert len(seen[0]) == len(seen[1]) == 20 and not seen[0] & seen[1]


def test_truncation_is_counted_and_drop_skips_pairs():
    it = _batches(seq_len=14, truncation="truncate_left")
    batch = next(it)
    assert it.truncated > 0 and it.dropped == 0
    full = batch["chosen_segment_ids"].sum(1) == 14
    assert full.any()
    np.testing.assert_array_equal(batch["chosen_tokens"][full, -1], TOK.eos_id)  # the end survives
    it = _batches(seq_len=19, truncation="drop")
    next(it)
    assert it.dropped > 0 and it.truncated == 0
    with pytest.raises(ValueError, match="every preference pair is longer"):
        next(_batches(seq_len=5, truncation="drop"))


# ---------------------------------------------------------------------- gaze features
def test_sequence_features_line_up_with_the_ids_bos_and_eos_rows_zero():
    from jaxpost.data.preference import encode_sequence_features
    from jaxpost.rl.gaze_reward import GazeFeaturizer
    from tests.gaze_testing import FakeTokenGaze, fake_trt
    featurize = GazeFeaturizer(TOK, FakeTokenGaze(), ("TRT", "FFD"))
    for prompt, completion, eos in (("<bos><|user|>q<|assistant|>", "ab", True),
                                    ("plain ", "text", False)):
        ids, f = encode_sequence_features(TOK, prompt, completion, featurize, add_eos=eos)
        assert ids == encode_sequence(TOK, prompt, completion, add_eos=eos)
        assert f.shape == (len(ids), 2) and f.dtype == np.float32
        want = [0.0 if i >= 256 else fake_trt(i) for i in ids]  # BOS/EOS/chat markers: 0
        np.testing.assert_allclose(f[:, 0], want)
        np.testing.assert_allclose(f[:, 1], np.asarray(want) / 2)
    with pytest.raises(ValueError, match="one row per token"):
        GazeFeaturizer(TOK, type("Bad", (), {"token_features": lambda s, t, x: {"TRT": [1.0]}})(),
                       ("TRT",))("two tokens")


def test_pad_features_truncates_like_pad_sequences():
    from jaxpost.data.preference import pad_features
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8]]
    feats = [np.array(s, np.float32)[:, None] * [1.0, -1.0] for s in seqs]
    for mode in ("truncate_left", "truncate_right"):
        t, s, _ = pad_sequences(seqs, 4, 0, mode)
        f = pad_features(feats, 4, 2, mode)
        np.testing.assert_array_equal(f[..., 0], t * s)
        np.testing.assert_array_equal(f[..., 1], -t * s)


def test_batches_with_a_psycholinguistic_featurizer_align_features_with_tokens():
    """The data path of a GazeReward model: predictor -> word->token remap -> [B, T, k]."""
    from jaxpost.rl.gaze_reward import featurizer_from_spec
    records = [{"prompt": "Say something", "chosen": "an extraordinarily long word",
                "rejected": "a cat"}] * 3
    featurize = featurizer_from_spec(TOK, "psycholinguistic", ("TRT",), 100.0)
    it = PreferenceBatches(records, range(3), TOK, batch_size=2, seq_len=64, shuffle=False,
                           featurize=featurize)
    batch = next(it)
    for side in ("chosen", "rejected"):
        tokens, seg, g = (batch[f"{side}_{k}"] for k in ("tokens", "segment_ids", "gaze"))
        assert g.shape == tokens.shape + (1,) and g.dtype == np.float32
        assert np.all(g[seg == 0] == 0) and np.all(g[tokens >= 256] == 0)  # pad, specials
        assert np.all(g[(tokens == ord(" "))] == 0)  # whitespace holds no word
        assert np.all(g[..., 0][(seg == 1) & (tokens < 256) & (tokens != ord(" "))] >= 0)
    # Each word's total over its tokens: a long rare word reads longer than a short
    # frequent one (ByteTokenizer: one token per ASCII character).
    ids, g = list(batch["chosen_tokens"][0]), batch["chosen_gaze"][0, :, 0]

    def word_total(word):
        w = [ord(c) for c in " " + word + " "]
        i = next(i for i in range(len(ids)) if ids[i:i + len(w)] == w) + 1
        np.testing.assert_allclose(g[i:i + len(word)], g[i])  # split evenly
        return float(g[i:i + len(word)].sum())
    assert word_total("extraordinarily") > word_total("long") > 0
