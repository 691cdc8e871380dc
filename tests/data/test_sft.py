"""Tests for jaxpost/data/sft.py: loss masks, EOS, truncation and counts."""

import numpy as np
import pytest

from jaxpost.data.sft import (
    DROPPED_NO_TARGETS,
    DROPPED_TOO_LONG,
    KEPT,
    TRUNCATED,
    ExampleStats,
    SFTExampleBuilder,
    assistant_spans,
    tokenize_chat,
    tokenize_prompt_completion,
    tokenize_record,
    truncate,
)
from jaxpost.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer
from tests.tokenizer_testing import INST_TEMPLATE, make_hf_tokenizer_dir, make_sentencepiece_model

BOS, EOS, SYS, USER, ASST = 257, 258, 259, 260, 261
CHAT = [{"role": "user", "content": "What is 3+4?"}, {"role": "assistant", "content": "7"}]


def _b(s):
    return list(s.encode())


def _targets(tok, ex):
    """The decoded target tokens, run by run."""
    runs, cur = [], []
    for t, m in zip(ex["tokens"], ex["loss_mask"]):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_prompt_completion_mask_is_completion_plus_eos():
    ex = tokenize_prompt_completion(ByteTokenizer(), "2+2=", "4")
    assert ex["tokens"].tolist() == [BOS, *_b("2+2="), *_b("4"), EOS]
    assert ex["loss_mask"].tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert ex["tokens"].dtype == np.int32 and ex["loss_mask"].dtype == np.float32


def test_prompt_completion_bos_eos_switches():
    ex = tokenize_prompt_completion(ByteTokenizer(), "ab", "cd", add_bos=False, add_eos=False)
    assert ex["tokens"].tolist() == _b("abcd")
    assert ex["loss_mask"].tolist() == [0, 0, 1, 1]


def test_first_token_is_never_a_target_even_with_empty_prompt():
    ex = tokenize_prompt_completion(ByteTokenizer(), "", "xy", add_bos=False)
    assert ex["tokens"].tolist() == [*_b("xy"), EOS]
    assert ex["loss_mask"].tolist() == [0, 1, 1]


def test_assistant_only_mask_multi_turn_byte_template():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "dd"}]
    ex = tokenize_chat(ByteTokenizer(), msgs)
    # <bos><|system|>s<|user|>a<|assistant|>b<eos><|user|>c<|assistant|>dd<eos>
    assert ex["tokens"].tolist() == [BOS, SYS, 115, USER, 97, ASST, 98, EOS, USER, 99, ASST,
                                     100, 100, EOS]
    assert ex["loss_mask"].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1]


def test_assistant_only_mask_chatml_excludes_header_and_trailing_newline(tmp_path):
    tok = HFTokenizer(make_hf_tokenizer_dir(tmp_path))
    msgs = CHAT + [{"role": "user", "content": "and 1+1?"},
                   {"role": "assistant", "content": "2, surely"}]
    text, spans = assistant_spans(tok, msgs)
    assert [text[a:b] for a, b in spans] == ["7<|im_end|>", "2, surely<|im_end|>"]
    ex = tokenize_chat(tok, msgs)
    assert _targets(tok, ex) == ["7<|im_end|>", "2, surely<|im_end|>"]
    assert tok.decode(ex["tokens"]) == text  # tokenized as a whole, nothing lost
    assert ex["tokens"][-1] != tok.eos_id  # template ends with "\n"; no EOS appended


def test_assistant_mask_sentencepiece_inst_template(tmp_path):
    tok = SentencePieceTokenizer(make_sentencepiece_model(tmp_path), chat_template=INST_TEMPLATE)
    ex = tokenize_chat(tok, CHAT)
    assert ex["tokens"][0] == tok.bos_id and ex["tokens"][-1] == tok.eos_id
    assert ex["loss_mask"][-1] == 1.0
    assert tok.decode(ex["tokens"][ex["loss_mask"] > 0]) == " 7</s>".lstrip()


def test_template_that_is_not_prefix_stable_falls_back_to_content_search():
    tok = ByteTokenizer()
    # the first thing rendered depends on the whole conversation: prefixes differ
    tok.chat_template = (
        "{{ messages|length }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    msgs = [{"role": "user", "content": "7?"}, {"role": "assistant", "content": "7"}]
    text, spans = assistant_spans(tok, msgs)
    assert text == "2<|user|>7?<|assistant|>7<eos>"
    assert [text[a:b] for a, b in spans] == ["7<eos>"]  # not the "7" of the question


def test_chat_eos_appended_only_when_template_has_no_end_of_turn():
    tok = ByteTokenizer()
    assert tokenize_chat(tok, CHAT)["tokens"].tolist().count(EOS) == 1  # template's own
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    ex = tokenize_chat(tok, CHAT)
    # EOS right after the reply, before the template's trailing newline
    assert tok.decode(ex["tokens"]) == "user: What is 3+4?\nassistant: 7<eos>\n"
    assert _targets(tok, ex) == ["7<eos>"]
    assert EOS not in tokenize_chat(tok, CHAT, add_eos=False)["tokens"]


def test_record_dispatch_and_conversational_prompt_completion():
    tok = ByteTokenizer()
    a = tokenize_record(tok, {"messages": CHAT})
    b = tokenize_record(tok, {"prompt": CHAT[:1], "completion": CHAT[1:]})
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
    with pytest.raises(ValueError, match="expected 'prompt' and 'completion', or 'messages'"):
        tokenize_record(tok, {"text": "x"})
    with pytest.raises(ValueError, match="both be strings or both be message lists"):
        tokenize_record(tok, {"prompt": "x", "completion": CHAT})


def _ex(n, first_target=3):
    return {"tokens": np.arange(n, dtype=np.int32),
            "loss_mask": (np.arange(n) >= first_target).astype(np.float32)}


def test_truncation_policies():
    ex = _ex(10)
    right, s = truncate(ex, 6, "truncate_right")
    assert s == TRUNCATED and right["tokens"].tolist() == [0, 1, 2, 3, 4, 5]
    assert right["loss_mask"].tolist() == [0, 0, 0, 1, 1, 1]
    left, s = truncate(ex, 6, "truncate_left")
    assert s == TRUNCATED and left["tokens"].tolist() == [4, 5, 6, 7, 8, 9]
    assert left["loss_mask"].tolist() == [0, 1, 1, 1, 1, 1]  # new first token: not a target
    assert truncate(ex, 6, "drop") == (None, DROPPED_TOO_LONG)
    kept, s = truncate(ex, 10, "drop")
    assert s == KEPT and kept is ex
    assert truncate(_ex(10, first_target=8), 6, "truncate_right") == (None, DROPPED_NO_TARGETS)
    with pytest.raises(ValueError, match="unknown truncation policy"):
        truncate(ex, 6, "middle")


def test_builder_counts_every_outcome():
    tok = ByteTokenizer()
    records = [{"prompt": "p", "completion": "c"},  # 4 tokens: kept
               {"prompt": "p", "completion": "c" * 20},  # long: truncated or dropped
               {"prompt": "p" * 20, "completion": "c"}]  # long prompt: no target left
    for policy, expected in [
            ("truncate_right", {"kept": 1, "truncated": 1, "dropped_too_long": 0,
                                "dropped_no_targets": 1}),
            ("truncate_left", {"kept": 1, "truncated": 2, "dropped_too_long": 0,
                               "dropped_no_targets": 0}),
            ("drop", {"kept": 1, "truncated": 0, "dropped_too_long": 2,
                      "dropped_no_targets": 0})]:
        builder = SFTExampleBuilder(tok, 8, truncation=policy)
        stats = ExampleStats()
        for r in records:
            out = builder(r)
            stats.add(out["status"])
            assert len(out["tokens"]) <= 8 and len(out["tokens"]) == len(out["loss_mask"])
        assert stats.to_dict() == expected, policy
        assert stats.seen == 3
