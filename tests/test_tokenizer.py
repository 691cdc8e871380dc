"""Tests for jaxpost/tokenizer.py: round trips, offsets, chat templates, loading."""

import os
import pickle

import pytest

from jaxpost.tokenizer import (
    BYTE_CHAT_TEMPLATE,
    ByteTokenizer,
    ChatTemplateError,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    render_chat_template,
)
from tests.tokenizer_testing import (
    INST_TEMPLATE,
    make_hf_tokenizer_dir,
    make_sentencepiece_model,
)

TEXTS = ["", "hello world", "What is 347+58?", "héllo wörld, ça va? 日本語 🙂",
         "tabs\tand\nnewlines  double  spaces"]
CHAT = [{"role": "user", "content": "What is 3+4?"}, {"role": "assistant", "content": "7"}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_tokenizer_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return make_sentencepiece_model(tmp_path_factory.mktemp("sp"))


# --------------------------------------------------------------------------- byte


@pytest.mark.parametrize("text", TEXTS + ["<bos><|user|>x<|assistant|>y<eos>"])
def test_byte_tokenizer_round_trips(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_ids_are_utf8_bytes_and_special_strings_are_single_tokens():
    tok = ByteTokenizer()
    assert tok.encode("é") == list("é".encode())
    assert tok.encode("a<eos>") == [97, tok.eos_id]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 262)
    assert tok.decode([104, 105, tok.eos_id], skip_special_tokens=True) == "hi"


def test_byte_offsets_cover_each_character():
    tok = ByteTokenizer()
    text = "aé<eos>b"
    ids, offsets = tok.encode_with_offsets(text)
    assert len(ids) == len(offsets) == 1 + 2 + 1 + 1
    assert [text[a:b] for a, b in offsets] == ["a", "é", "é", "<eos>", "b"]


def test_byte_chat_template_renders_hand_written_text():
    tok = ByteTokenizer()
    msgs = [{"role": "system", "content": "Be brief."}] + CHAT
    assert tok.apply_chat_template(msgs) == (
        "<bos><|system|>Be brief.<|user|>What is 3+4?<|assistant|>7<eos>")
    assert tok.apply_chat_template(CHAT[:1], add_generation_prompt=True) == (
        "<bos><|user|>What is 3+4?<|assistant|>")


@pytest.mark.parametrize("gen", [False, True])
def test_byte_chat_template_fast_path_equals_jinja_rendering(gen):
    tok = ByteTokenizer()
    convs = [CHAT, CHAT[:1], [{"role": "system", "content": "s"}] + CHAT * 3, []]
    for msgs in convs:
        jinja = render_chat_template(BYTE_CHAT_TEMPLATE, msgs, add_generation_prompt=gen,
                                     bos_token="<bos>", eos_token="<eos>")
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == jinja


def test_byte_chat_template_rejects_unknown_roles_in_both_paths():
    tok = ByteTokenizer()
    with pytest.raises(ChatTemplateError, match="roles system, user and assistant"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="roles system, user and assistant"):
        render_chat_template(BYTE_CHAT_TEMPLATE, [{"role": "tool", "content": "x"}],
                             bos_token="<bos>", eos_token="<eos>")


# --------------------------------------------------------------------------- HF


@pytest.mark.parametrize("text", TEXTS)
def test_hf_tokenizer_round_trips(hf_dir, text):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.decode(tok.encode(text)) == text


def test_hf_tokenizer_reads_special_tokens_from_config(hf_dir):
    tok = HFTokenizer(hf_dir)
    assert tok.eos_token == "<|im_end|>" and tok.eos_id == tok.encode("<|im_end|>")[0]
    assert tok.bos_id is None and not tok.add_bos
    assert tok.pad_id == tok.encode("<|endoftext|>")[0]
    # special strings in text become single ids (what a rendered template relies on)
    ids = tok.encode("hi<|im_end|>")
    assert ids[-1] == tok.eos_id
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_hf_chat_template_renders_hand_written_text(hf_dir):
    tok = HFTokenizer(hf_dir)
    assert tok.apply_chat_template(CHAT) == (
        "<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\n")
    assert tok.apply_chat_template(CHAT[:1], add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n")


def test_hf_template_sees_bos_eos_and_raise_exception(tmp_path):
    d = make_hf_tokenizer_dir(tmp_path, chat_template=INST_TEMPLATE,
                              bos_token={"content": "<s>", "special": True},
                              eos_token="</s>", config_extra={"add_bos_token": True})
    tok = HFTokenizer(d)
    assert tok.bos_token == "<s>" and tok.add_bos
    assert tok.apply_chat_template(CHAT) == "<s>[INST] What is 3+4? [/INST] 7 </s>"
    with pytest.raises(ChatTemplateError, match="must alternate"):
        tok.apply_chat_template(CHAT[::-1])


def test_hf_chat_template_from_jinja_file_and_named_list(tmp_path):
    d = make_hf_tokenizer_dir(tmp_path / "a", chat_template=[
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}])
    assert HFTokenizer(d).chat_template == "DEFAULT"
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("{{ messages[0]['content'] }}!")
    assert HFTokenizer(d).apply_chat_template(CHAT) == "What is 3+4?!"


def test_hf_template_supports_transformers_generation_tag(hf_dir):
    tok = HFTokenizer(hf_dir, chat_template=(
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}|{% endif %}"
        "{% endfor %}"))
    assert tok.apply_chat_template(CHAT) == "What is 3+4?|7"


def test_hf_unknown_special_token_is_an_error_naming_the_key(tmp_path):
    d = make_hf_tokenizer_dir(tmp_path, eos_token="<nope>")
    with pytest.raises(ValueError, match="eos_token='<nope>'"):
        HFTokenizer(d)


def test_hf_offsets_slice_back_to_text(hf_dir):
    tok = HFTokenizer(hf_dir)
    text = "<|im_start|>user\nhéllo 3+4<|im_end|>\n"
    ids, offsets = tok.encode_with_offsets(text)
    assert len(ids) == len(offsets)
    assert "".join(text[a:b] for a, b in offsets) == text


# --------------------------------------------------------------------------- sentencepiece


@pytest.mark.parametrize("text", ["hello world", "What is 347+58?", "héllo wörld 日本"])
def test_sentencepiece_round_trips(sp_path, text):
    tok = load_tokenizer(sp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_special_tokens_and_template(sp_path):
    tok = SentencePieceTokenizer(sp_path, chat_template=INST_TEMPLATE)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>") and tok.add_bos
    text = tok.apply_chat_template(CHAT)
    assert text == "<s>[INST] What is 3+4? [/INST] 7 </s>"
    ids, offsets = tok.encode_with_offsets(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert text[slice(*offsets[-1])] == "</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "[INST] What is 3+4? [/INST] 7"


# --------------------------------------------------------------------------- common


def test_load_tokenizer_dispatch_and_errors(hf_dir, sp_path, tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    assert isinstance(load_tokenizer(sp_path), SentencePieceTokenizer)
    sp_dir = tmp_path / "spdir"
    sp_dir.mkdir()
    (sp_dir / "tokenizer.model").write_bytes(open(sp_path, "rb").read())
    assert isinstance(load_tokenizer(sp_dir), SentencePieceTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer spec"):
        load_tokenizer("gpt2")
    with pytest.raises(ValueError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path / "spdir" / "..")


def test_tokenizer_without_template_says_how_to_get_one(sp_path):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        load_tokenizer(sp_path).apply_chat_template(CHAT)


def test_tokenizers_pickle(hf_dir, sp_path):
    for tok in (ByteTokenizer(), HFTokenizer(hf_dir), SentencePieceTokenizer(sp_path)):
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.encode("hello world") == tok.encode("hello world")


def test_hf_config_json_is_validated(tmp_path):
    d = make_hf_tokenizer_dir(tmp_path)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        HFTokenizer(d)
