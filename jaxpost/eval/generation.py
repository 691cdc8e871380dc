"""Generation-based accuracy: sample completions of held-out prompts and check them."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxpost.sampling import Sampler, SamplingConfig
from jaxpost.sharding import global_value
from jaxpost.tokenizer import Tokenizer


def pad_prompts(prompt_ids: Sequence[Sequence[int]], pad_id: int, rows: int | None = None,
                width: int | None = None):
    """Right-padded int32 [rows, width] and lengths [rows]; extra rows repeat row 0.

    `width` defaults to the longest prompt; a fixed width keeps the sampler's shapes static.
    """
    rows = rows or len(prompt_ids)
    width = width or max(len(p) for p in prompt_ids)
    out = np.full((rows, width), pad_id, np.int32)
    lengths = np.zeros((rows,), np.int32)
    for i in range(rows):
        ids = prompt_ids[i] if i < len(prompt_ids) else prompt_ids[0]
        out[i, :len(ids)] = ids
        lengths[i] = len(ids)
    return out, lengths


def generate_texts(sampler: Sampler, params, tokenizer: Tokenizer,
                   prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                   batch_size: int, rng: jax.Array, width: int | None = None) -> list[str]:
    """Decoded completions (special tokens kept) of every prompt, in batches.

    `width` pads every batch's prompts to that many tokens (one sampler compilation);
    default: each batch's longest prompt.
    """
    texts: list[str] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        prompts, lengths = pad_prompts(chunk, tokenizer.pad_id, rows=batch_size, width=width)
        rng, key = jax.random.split(rng)
        # Every process passes the same prompts; on several hosts the rows come back
        # from all of them (a collective).
        out = global_value(sampler(params, prompts, lengths, key, sampling))
        for i in range(len(chunk)):
            texts.append(tokenizer.decode(out.tokens[i, :out.lengths[i]].tolist()))
    return texts


def generation_accuracy(sampler: Sampler, params, tokenizer: Tokenizer,
                        examples: Sequence[dict[str, Any]],
                        check: Callable[[str, str], bool], sampling: SamplingConfig, *,
                        batch_size: int, rng: jax.Array) -> dict[str, float]:
    """Fraction of `examples` (`prompt_ids`, `answer`) whose completion passes `check`."""
    texts = generate_texts(sampler, params, tokenizer, [e["prompt_ids"] for e in examples],
                           sampling, batch_size=batch_size, rng=rng)
    correct = [check(t, e["answer"]) for t, e in zip(texts, examples)]
    return {"accuracy": float(np.mean(correct)) if correct else 0.0,
            "num_examples": float(len(correct))}
