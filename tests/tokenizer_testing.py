"""Tiny tokenizers trained on made-up text, for tests (no downloads)."""

from __future__ import annotations

import json
import os

CORPUS = [
    "hello world, what is 3+4? it is 7.",
    "the quick brown fox jumps over the lazy dog",
    "héllo wörld, ça va? naïve café",
    "user assistant system answer question",
    "What is 12+30? 42. What is 100+250? 350.",
] * 20

#: A ChatML template (as Qwen2 uses), written with transformers' usual idioms.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: A Llama-2-like template: BOS from the variable, strict alternation via raise_exception.
INST_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

HF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]


def make_hf_tokenizer_dir(path, *, chat_template: str = CHATML_TEMPLATE,
                          bos_token: str | None = None, eos_token: str = "<|im_end|>",
                          pad_token: str | None = "<|endoftext|>",
                          config_extra: dict | None = None,
                          extra_specials: tuple[str, ...] = ()) -> str:
    """Writes a byte-level BPE tokenizer.json + tokenizer_config.json into `path`
    (`extra_specials`: more special tokens, e.g. Llama 3's header tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.makedirs(path, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=HF_SPECIALS + list(extra_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"chat_template": chat_template, "eos_token": eos_token,
              "bos_token": bos_token, "pad_token": pad_token}
    config.update(config_extra or {})
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return os.fspath(path)


def make_sentencepiece_model(path) -> str:
    """Trains a small BPE sentencepiece model with byte fallback; returns the .model path."""
    import sentencepiece as spm

    prefix = os.path.join(os.fspath(path), "sp")
    os.makedirs(os.fspath(path), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=prefix, vocab_size=320,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
        normalization_rule_name="identity")
    return prefix + ".model"
