"""Reward of the mention task (`jaxpost.data.mention`): which asked-for words were said."""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def mentioned(completion: str, entities: str) -> float:
    """Fraction of the comma-separated `entities` that occur as words of `completion`
    (case-insensitive; punctuation ignored; each counted once)."""
    asked = [e.strip().lower() for e in entities.split(",") if e.strip()]
    if not asked:
        raise ValueError(f"entities={entities!r} names no word")
    said = {w.lower() for w in _WORD.findall(completion)}
    return sum(e in said for e in asked) / len(asked)


def mention_reward(prompts: Sequence[str], completions: Sequence[str], *,
                   entities: Sequence[str], **columns) -> list[float]:
    """A GRPO reward function (TRL convention): `mentioned` per completion, in [0, 1]."""
    del prompts, columns
    return [mentioned(c, e) for c, e in zip(completions, entities, strict=True)]


__all__ = ["mention_reward", "mentioned"]
