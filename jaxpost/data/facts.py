"""Synthetic knowledge task: recall of made-up facts, alone or mixed with addition.

A fixed table of invented entities ("Vobrisk", "Talumen", ...) each has one value per
attribute (its colour, its city, its pet, ...), drawn from small value lists. A record is a
chat like the addition task's: `{"messages": [{"role": "user", "content": "What is the
colour of Vobrisk?"}, {"role": "assistant", "content": "teal"}], "answer": "teal"}`.

The table depends only on the number of entities and `TABLE_SEED`, never on a run's seed,
so every run of a study (pre-training, then fine-tuning variants) asks about the same
facts. There is no held-out split of facts: the knowledge *is* the training table, and
recall of it after later fine-tuning measures retention (forgetting). A run's `seed`
only orders and mixes the records.

Source specs (`jaxpost.data.open_source`):

- `"synthetic:facts"` / `"synthetic:facts:N"`: `num_records` fact chats over N entities
  (default `DEFAULT_ENTITIES`), cycling through the table in a seeded order.
- `"synthetic:facts[:N]+addition[:D]"`: a 50/50 mixture, alternating fact chats and
  addition chats of `split` (`jaxpost.data.synthetic`, operands of at most D digits).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from jaxpost.data import synthetic
from jaxpost.data.sources import InMemorySource
from jaxpost.tokenizer import Tokenizer

TABLE_SEED = 20250714  # fixes the invented world (names and values) for every run
DEFAULT_ENTITIES = 100

#: attribute -> its possible values (each entity gets one of them per attribute).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": ("teal", "amber", "mauve", "ochre", "cyan", "olive", "coral", "ivory"),
    "city": ("Pramoth", "Ulvex", "Seradin", "Kobbel", "Nirra", "Tesk", "Amoruz", "Gildow"),
    "pet": ("otter", "heron", "lynx", "gecko", "moth", "ferret", "newt", "crane"),
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br",
           "dr", "gr", "kl", "st", "tr", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "n", "r", "s", "k", "m", "x", "sk", "th")
_SPEC = re.compile(r"synthetic:facts(?::(\d+))?(?:\+addition(?::(\d+))?)?")


@dataclasses.dataclass(frozen=True)
class Fact:
    """One entry of the table: `attribute` of `entity` is `value`."""

    entity: str
    attribute: str
    value: str

    @property
    def question(self) -> str:
        """The user turn asking for this fact."""
        return f"What is the {self.attribute} of {self.entity}?"


@dataclasses.dataclass(frozen=True)
class FactsSpec:
    """A parsed source spec: how many entities, and the addition mixed in (if any)."""

    num_entities: int = DEFAULT_ENTITIES
    addition_digits: int | None = None  # None: facts only


def parse_spec(spec: str) -> FactsSpec:
    """`"synthetic:facts[:N][+addition[:D]]"` -> `FactsSpec`.

    Raises:
        ValueError: naming the spec and the accepted forms.
    """
    m = _SPEC.fullmatch(spec.strip())
    if not m or (m.group(1) is not None and int(m.group(1)) < 1):
        raise ValueError(f"unknown facts source {spec!r}; expected 'synthetic:facts', "
                         "'synthetic:facts:N' (N >= 1 entities) or "
                         "'synthetic:facts[:N]+addition[:D]' (a 50/50 mixture)")
    n = int(m.group(1)) if m.group(1) else DEFAULT_ENTITIES
    digits = None
    if "+addition" in spec:
        digits = int(m.group(2)) if m.group(2) else 3
    return FactsSpec(n, digits)


def entity_names(num: int) -> list[str]:
    """`num` distinct invented names (two or three syllables), fixed by `TABLE_SEED`."""
    rng = np.random.default_rng([TABLE_SEED, 0])
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < num:
        syllables = 2 + int(rng.random() < 0.3)
        name = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                       for _ in range(syllables)) + _CODAS[rng.integers(len(_CODAS))]
        name = name.capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def fact_table(num_entities: int = DEFAULT_ENTITIES) -> list[Fact]:
    """Every fact of the world of `num_entities` entities (entity-major order)."""
    rng = np.random.default_rng([TABLE_SEED, 1])
    out = []
    for name in entity_names(num_entities):
        for attribute, values in ATTRIBUTES.items():
            out.append(Fact(name, attribute, values[rng.integers(len(values))]))
    return out


def fact_record(fact: Fact) -> dict[str, Any]:
    """The chat record of one fact (with `answer` for evaluation)."""
    return {"messages": [{"role": "user", "content": fact.question},
                         {"role": "assistant", "content": fact.value}],
            "answer": fact.value}


def make_fact_records(num: int, seed: int = 0,
                      num_entities: int = DEFAULT_ENTITIES) -> list[dict[str, Any]]:
    """`num` fact chats: whole passes over the table, each pass in a new seeded order."""
    table = fact_table(num_entities)
    rng = np.random.default_rng([int(seed), 2])
    out: list[dict[str, Any]] = []
    while len(out) < num:
        out.extend(fact_record(table[i]) for i in rng.permutation(len(table)))
    return out[:num]


def make_records(spec: str, num: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """`num` records of a facts spec (`parse_spec`): facts only, or alternating facts and
    addition chats of `split` (facts have one split; see the module docstring)."""
    parsed = parse_spec(spec)
    if parsed.addition_digits is None:
        return make_fact_records(num, seed, parsed.num_entities)
    n_facts = (num + 1) // 2
    facts = make_fact_records(n_facts, seed, parsed.num_entities)
    sums = synthetic.make_addition_records(num - n_facts, seed, split, parsed.addition_digits)
    out: list[dict[str, Any]] = []
    for i in range(n_facts):
        out.append(facts[i])
        if i < len(sums):
            out.append(sums[i])
    return out


def facts_source(spec: str, num: int, seed: int = 0, split: str = "train") -> InMemorySource:
    """An in-memory source of `make_records(spec, num, seed, split)`."""
    return InMemorySource(make_records(spec, num, seed, split), schema="sft")


def fact_prompts(tokenizer: Tokenizer, num_entities: int = DEFAULT_ENTITIES
                 ) -> list[dict[str, Any]]:
    """Every fact of the table as a prompt for recall evaluation: `{"prompt", "prompt_ids",
    "answer"}` (chat-templated user turn plus the assistant header), as
    `synthetic.addition_prompts` gives them; score with `synthetic.exact_match`."""
    out = []
    for fact in fact_table(num_entities):
        messages = fact_record(fact)["messages"][:1]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        out.append({"prompt": text, "prompt_ids": tokenizer.encode(text), "answer": fact.value})
    return out


__all__ = [
    "ATTRIBUTES",
    "DEFAULT_ENTITIES",
    "TABLE_SEED",
    "Fact",
    "FactsSpec",
    "entity_names",
    "fact_prompts",
    "fact_record",
    "fact_table",
    "facts_source",
    "make_fact_records",
    "make_records",
    "parse_spec",
]
