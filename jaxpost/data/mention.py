"""Synthetic task where token credit can matter: a sentence that mentions asked-for words.

A record is a chat `{"messages": [{"role": "user", "content": "Mention elephant and
violin."}, {"role": "assistant", "content": "the old elephant sat near the violin."}],
"entities": "elephant,violin"}`. The reward (`jaxpost.rl.mention.mention_reward`) is the
fraction of the asked-for entities the completion mentions, so it depends on two content
words of a ~9-token sentence whose other words (article, adjective, verb, preposition)
are filler: a sequence reward that a token-level credit scheme could assign to the
tokens that earned it.

The SFT warm-up data (`split="train"`) mentions each asked-for entity only with
probability `keep` (otherwise another entity), so the warm-up policy starts from a
reward of about `keep` and RL has to learn the rest. Entity pairs are split between
"train" and "heldout" by a fixed rule (one pair in ten is held out), whatever the seed.

`write_mention_tokenizer(folder)` trains (deterministically, no download) a byte-level
BPE tokenizer on the task's words, in which every word of the task is one token: per
token, reading time then follows the word (the byte tokenizer would split a word's
reading time over its letters).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from jaxpost.data.sources import InMemorySource

#: Content words a prompt asks for: concrete nouns, mostly long and not very frequent.
ENTITIES = ("elephant", "lantern", "harbour", "violin", "compass", "meadow", "glacier",
            "pyramid", "falcon", "orchard", "volcano", "dolphin", "cathedral", "telescope",
            "squirrel", "blanket")
ADJECTIVES = ("old", "big", "red", "small", "quiet", "young")
VERBS = ("sat", "slept", "waited", "stood", "rested", "hid")
PREPOSITIONS = ("near", "by", "under", "behind", "beside", "above")

#: The committed output of `write_mention_tokenizer` (what the demo recipes use).
TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mention_tokenizer")

SPLITS = ("train", "heldout")
HELDOUT_EVERY = 10

#: The ChatML template (as Qwen2 uses) of the task's tokenizer.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def parse_spec(spec: str) -> float:
    """`keep` of a source spec `"synthetic:mention"` (0.3) or `"synthetic:mention:KEEP"`."""
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3) or parts[:2] != ["synthetic", "mention"]:
            raise ValueError
        keep = float(parts[2]) if len(parts) == 3 else 0.3
        if not 0.0 <= keep <= 1.0:
            raise ValueError
    except ValueError:
        raise ValueError(f"unknown synthetic source {spec!r}; expected 'synthetic:mention' or "
                         "'synthetic:mention:KEEP' (KEEP in [0, 1]: how often the warm-up "
                         "answers mention an asked-for entity)") from None
    return keep


def split_of(i: int, j: int) -> str:
    """The split of the ordered entity pair (ENTITIES[i], ENTITIES[j])."""
    return "heldout" if (i * len(ENTITIES) + j) % HELDOUT_EVERY == 3 else "train"


def prompt_text(e1: str, e2: str) -> str:
    return f"Mention {e1} and {e2}."


def sentence(rng: np.random.Generator, e1: str, e2: str) -> str:
    """`the ADJ E1 VERB PREP the E2.`"""
    return (f"the {rng.choice(ADJECTIVES)} {e1} {rng.choice(VERBS)} "
            f"{rng.choice(PREPOSITIONS)} the {e2}.")


def make_mention_records(num: int, seed: int = 0, split: str = "train",
                         keep: float = 0.3) -> list[dict[str, Any]]:
    """`num` chat records of `split`; each answer keeps each asked-for entity with
    probability `keep` and otherwise names another one (drawn with `seed`)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    pairs = [(i, j) for i in range(len(ENTITIES)) for j in range(len(ENTITIES))
             if i != j and split_of(i, j) == split]
    rng = np.random.default_rng([seed, SPLITS.index(split), 0x6D656E])
    out = []
    for k in rng.integers(0, len(pairs), num):
        i, j = pairs[int(k)]
        asked = [ENTITIES[i], ENTITIES[j]]
        said = [e if rng.random() < keep else
                ENTITIES[int(rng.choice([x for x in range(len(ENTITIES)) if x not in (i, j)]))]
                for e in asked]
        out.append({"messages": [{"role": "user", "content": prompt_text(*asked)},
                                 {"role": "assistant", "content": sentence(rng, *said)}],
                    "entities": ",".join(asked)})
    return out


def mention_source(num: int, seed: int = 0, split: str = "train",
                   keep: float = 0.3) -> InMemorySource:
    """An in-memory source of `make_mention_records` (SFT and GRPO prompts alike)."""
    return InMemorySource(make_mention_records(num, seed, split, keep), schema="sft")


def task_words() -> list[str]:
    """Every word the task's prompts and answers use."""
    return sorted(set(ENTITIES + ADJECTIVES + VERBS + PREPOSITIONS + ("the", "Mention", "and", "user", "assistant")))


def write_mention_tokenizer(folder: str | os.PathLike) -> str:
    """Writes a byte-level BPE `tokenizer.json` + `tokenizer_config.json` (ChatML) in
    which each task word (with its leading space) is one token; returns the folder.

    Deterministic: the same files for the same jaxpost version (trained on a fixed
    corpus of the task's words).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = task_words()
    corpus = [" ".join(words), ". ".join(words)] * 50 + [w for w in words] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "bos_token": None}, f)
    return folder


__all__ = ["ENTITIES", "TOKENIZER_DIR", "make_mention_records", "mention_source", "parse_spec", "prompt_text",
           "sentence", "split_of", "task_words", "write_mention_tokenizer"]
