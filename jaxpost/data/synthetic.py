"""Synthetic demo task: multi-digit addition as a chat, generated from a seed.

A record is `{"messages": [{"role": "user", "content": "What is 347+58?"},
{"role": "assistant", "content": "405"}], "answer": "405"}`. With the byte tokenizer the
whole example is `<bos><|user|>What is 347+58?<|assistant|>405<eos>`: at most 24 tokens
for 3-digit operands.

Splits never overlap, whatever the seeds: every ordered pair `(a, b)` belongs
to exactly one split, decided by a fixed integer hash of the pair (about 1 pair in
`HELDOUT_EVERY` is held out). Each split is then sampled from its own pairs with a
`numpy` generator seeded by `(seed, split)`.

`exact_match` checks a generated completion, `addition_prompts` gives rendered prompts
plus answers for generation-based eval, `addition_reward` is the same check as a reward
function `(prompts, completions, answer=...) -> list[float]` for GRPO.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jaxpost.data.sources import InMemorySource
from jaxpost.tokenizer import Tokenizer

SPLITS = ("train", "heldout")
HELDOUT_EVERY = 10  # about one pair in ten is held out
_SPLIT_CODE = {"train": 0, "heldout": 1}

#: End-of-generation strings `exact_match` cuts at (the first occurrence).
DEFAULT_STOP_STRINGS = ("<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>",
                        "<|end_of_text|>", "<|user|>", "<|assistant|>", "<|system|>",
                        "<pad>")


def _pair_hash(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """splitmix64 of (a, b): a fixed hash, the same on every machine and Python run."""
    with np.errstate(over="ignore"):
        x = (a.astype(np.uint64) << np.uint64(32)) ^ b.astype(np.uint64)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def parse_spec(spec: str) -> int:
    """max_digits of a source spec "synthetic:addition" (3) or "synthetic:addition:D"."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[:2] != ["synthetic", "addition"] or (
            len(parts) == 3 and not parts[2].isdigit()):
        raise ValueError(f"unknown synthetic source {spec!r}; expected 'synthetic:addition' or "
                         "'synthetic:addition:D' (D = most digits of an operand)")
    return int(parts[2]) if len(parts) == 3 else 3


def split_of(a: int, b: int) -> str:
    """The split the problem `a + b` belongs to ("train" or "heldout")."""
    h = _pair_hash(np.asarray([a]), np.asarray([b]))[0]
    return "heldout" if int(h % np.uint64(HELDOUT_EVERY)) == 0 else "train"


def question(a: int, b: int) -> str:
    """The user turn for `a + b`."""
    return f"What is {a}+{b}?"


def addition_record(a: int, b: int) -> dict[str, Any]:
    """The chat record for `a + b` (with `answer` as a column for rewards/eval)."""
    answer = str(a + b)
    return {"messages": [{"role": "user", "content": question(a, b)},
                         {"role": "assistant", "content": answer}],
            "answer": answer}


def addition_pairs(num: int, seed: int, split: str = "train", max_digits: int = 3,
                   unique: bool = True) -> list[tuple[int, int]]:
    """Samples `num` operand pairs of one split, deterministically from `seed`.

    Each operand first draws a digit count uniformly in [1, max_digits], then a value
    with that many digits (0..9 for one digit), so short problems are common.

    Args:
        num: how many pairs.
        seed: generator seed; the same (seed, split, max_digits) gives the same list.
        split: "train" or "heldout".
        max_digits: most digits of an operand.
        unique: no pair twice.

    Returns:
        A list of (a, b).

    Raises:
        ValueError: on an unknown split, or if the split has fewer than `num` pairs.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if max_digits < 1:
        raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], int(max_digits)])
    lo = np.asarray([0] + [10 ** (d - 1) for d in range(2, max_digits + 1)])
    hi = np.asarray([10 ** d for d in range(1, max_digits + 1)])
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    attempts = 0
    while len(out) < num:
        attempts += 1
        if attempts > 200:
            raise ValueError(f"could not draw {num} {'distinct ' if unique else ''}{split} "
                             f"pairs with max_digits={max_digits}; ask for fewer")
        m = 2 * (num - len(out)) + 16
        da, db = rng.integers(0, max_digits, m), rng.integers(0, max_digits, m)
        a, b = rng.integers(lo[da], hi[da]), rng.integers(lo[db], hi[db])
        in_heldout = (_pair_hash(a, b) % np.uint64(HELDOUT_EVERY)) == 0
        keep = in_heldout if split == "heldout" else ~in_heldout
        for x, y in zip(a[keep].tolist(), b[keep].tolist()):
            if unique and (x, y) in seen:
                continue
            seen.add((x, y))
            out.append((x, y))
            if len(out) == num:
                break
    return out


def make_addition_records(num: int, seed: int = 0, split: str = "train",
                          max_digits: int = 3, unique: bool = True) -> list[dict[str, Any]]:
    """`num` chat records of one split (see `addition_pairs` for the arguments)."""
    return [addition_record(a, b)
            for a, b in addition_pairs(num, seed, split, max_digits, unique)]


def addition_source(num: int, seed: int = 0, split: str = "train",
                    max_digits: int = 3) -> InMemorySource:
    """An in-memory source of `num` addition records, ready for `make_sft_iterator`."""
    return InMemorySource(make_addition_records(num, seed, split, max_digits), schema="sft")


def exact_match(completion: str, answer: str,
                stop_strings: Iterable[str] = DEFAULT_STOP_STRINGS) -> bool:
    """Whether a generated completion states exactly the answer.

    The completion is cut at the first stop string (EOS and friends, whatever follows is
    not part of the reply), then surrounding whitespace is ignored.

    Args:
        completion: decoded generated text (special tokens kept or skipped).
        answer: the expected answer, e.g. "405".
        stop_strings: strings that end a reply.

    Returns:
        True if the reply equals the answer.
    """
    text = completion
    for s in stop_strings:
        k = text.find(s)
        if k >= 0:
            text = text[:k]
    return text.strip() == str(answer).strip()


def addition_prompts(tokenizer: Tokenizer, num: int, seed: int = 0, split: str = "heldout",
                     max_digits: int = 3) -> list[dict[str, Any]]:
    """Prompts for generation-based eval (or GRPO), with their answers.

    Args:
        tokenizer: tokenizer whose chat template renders the prompt.
        num: how many prompts.
        seed: sampling seed.
        split: "heldout" (default, never seen in training) or "train".
        max_digits: most digits of an operand.

    Returns:
        A list of `{"prompt": str, "prompt_ids": list[int], "answer": str}`; `prompt` is
        the chat-templated user turn followed by the assistant header, `prompt_ids` its
        ids (BOS included by the template), ready to prefill.
    """
    out = []
    for rec in make_addition_records(num, seed, split, max_digits):
        text = tokenizer.apply_chat_template(rec["messages"][:1], add_generation_prompt=True)
        out.append({"prompt": text, "prompt_ids": tokenizer.encode(text),
                    "answer": rec["answer"]})
    return out


def addition_reward(prompts: Sequence[str], completions: Sequence[str], *,
                    answer: Sequence[str], **_: Any) -> list[float]:
    """Reward function (TRL convention): 1.0 for an exact answer, else 0.0."""
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    return [float(exact_match(c, a)) for c, a in zip(completions, answer)]



def parse_question(text: str) -> tuple[int, int] | None:
    """(a, b) from a prompt holding "What is a+b?", or None."""
    m = re.search(r"What is (\d+)\+(\d+)\?", text)
    return None if m is None else (int(m.group(1)), int(m.group(2)))


def wrong_answer(a: int, b: int, rng: np.random.Generator) -> str:
    """A plausibly wrong answer to `a + b`: off by a little, or one digit changed.

    Half of the time the sum is shifted by one of ±1, ±2, ±10 (a carry slip); otherwise
    one digit of the sum is replaced by another (a leading digit never by 0). The result
    is never the correct sum and never negative.

    Args:
        a: first operand.
        b: second operand.
        rng: where the choices come from.

    Returns:
        The wrong answer as a decimal string.
    """
    correct = a + b
    while True:
        if rng.random() < 0.5:
            guess = correct + int(rng.choice([-10, -2, -1, 1, 2, 10]))
        else:
            digits = list(str(correct))
            k = int(rng.integers(len(digits)))
            choices = [d for d in "0123456789" if d != digits[k] and not (
                k == 0 and d == "0" and len(digits) > 1)]
            digits[k] = str(rng.choice(choices))
            guess = int("".join(digits))
        if guess >= 0 and guess != correct:
            return str(guess)


def addition_preference_records(num: int, seed: int = 0, split: str = "train",
                                max_digits: int = 3) -> list[dict[str, Any]]:
    """`num` preference pairs for reward-model training, of one split.

    A record is `{"prompt": [{"role": "user", "content": "What is 347+58?"}],
    "chosen": "405", "rejected": "415", "answer": "405"}`: the prompt as chat messages,
    `chosen` the correct sum, `rejected` a `wrong_answer`. Operand pairs come from
    `addition_pairs` (so train and held-out pairs never overlap); the wrong answers
    are drawn from their own generator seeded by `(seed, split, max_digits)`.

    Args:
        num: how many records.
        seed: generator seed; the same arguments give the same records.
        split: "train" or "heldout".
        max_digits: most digits of an operand.

    Returns:
        A list of preference records.
    """
    pairs = addition_pairs(num, seed, split, max_digits)  # checks split and max_digits
    rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], int(max_digits), 1])
    return [{"prompt": [{"role": "user", "content": question(a, b)}],
             "chosen": str(a + b), "rejected": wrong_answer(a, b, rng), "answer": str(a + b)}
            for a, b in pairs]
