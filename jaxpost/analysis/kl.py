"""Token-level KL of a fine-tuned model to its base on a fixed probe set (ALGORITHMS.md §3).

`KL_t = Σ_v p_c(v) (log p_c(v) − log p_0(v))`, the exact full-vocabulary KL of the
checkpoint's next-token distribution (p_c) from the base's (p_0) after every real token of
the probe, averaged over those tokens. Both distributions come from the one forward pass
(`jaxpost.models.Transformer`) and the one log-prob helper (`jaxpost.models.token_kl`).

The probe set is fixed for every checkpoint: texts (a JSONL file of `{"text": ...}`
lines), or continuations sampled from the *base* with the library's sampler (from
`{"prompt": ...}` lines, or from BOS alone), so a checkpoint is measured on text the base
finds typical, as the seed study does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models import ModelConfig, Transformer, token_kl


@dataclasses.dataclass(frozen=True)
class Probe:
    """Right-padded probe tokens [N, T] and their segment ids (1 real, 0 padding)."""

    tokens: np.ndarray  # int32 [N, T]
    segment_ids: np.ndarray  # int32 [N, T]

    @property
    def num_tokens(self) -> int:
        return int(self.segment_ids.sum())


def probe_from_ids(rows: Sequence[Sequence[int]], pad_id: int = 0, max_len: int | None = None
                   ) -> Probe:
    """A probe from token-id rows (cut to `max_len`; empty rows are an error)."""
    rows = [list(r)[:max_len] if max_len else list(r) for r in rows]
    if not rows or any(not r for r in rows):
        raise ValueError("the probe set needs at least one row, and no empty row")
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    seg = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
        seg[i, :len(r)] = 1
    return Probe(tokens, seg)


def read_probe_file(path: str | os.PathLike) -> list[dict[str, str]]:
    """The records of a probe JSONL file: each line an object with `text` (used as it is)
    or `prompt` (continued by the base). Errors name the file and line."""
    path = os.fspath(path)
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not any(
                    isinstance(rec.get(k), str) and rec[k] for k in ("text", "prompt")):
                raise ValueError(f"{path}:{n}: expected an object with a non-empty string "
                                 "'text' (a probe text) or 'prompt' (continued by the base)")
            out.append(rec)
    if not out:
        raise ValueError(f"{path}: no probe records")
    return out


def sample_probe(cfg: ModelConfig, params, prompt_ids: Sequence[Sequence[int]], *,
                 max_new_tokens: int, seed: int = 0, temperature: float = 1.0,
                 pad_id: int = 0, eos_ids: tuple[int, ...] | None = None,
                 batch_size: int = 16) -> list[list[int]]:
    """Prompt + a sampled continuation from the model (`jaxpost.sampling.Sampler`), per
    prompt: the rows of a generated probe set."""
    from jaxpost.eval.generation import pad_prompts
    from jaxpost.sampling import Sampler, SamplingConfig

    sampler = Sampler(cfg)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                              pad_id=pad_id, eos_ids=eos_ids)
    rng = jax.random.key(seed)
    rows: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = [list(p) for p in prompt_ids[start:start + batch_size]]
        prompts, lengths = pad_prompts(chunk, pad_id, rows=batch_size)
        rng, key = jax.random.split(rng)
        out = jax.device_get(sampler(params, prompts, lengths, key, sampling))
        for i, p in enumerate(chunk):
            rows.append(p + out.tokens[i, :out.lengths[i]].tolist())
    return rows


@functools.lru_cache(maxsize=8)
def _kl_fn(cfg: ModelConfig):
    model = Transformer(cfg)

    @jax.jit
    def kl(params, base_params, tokens, segment_ids):
        logits = model.apply({"params": params}, tokens, segment_ids=segment_ids)
        base_logits = model.apply({"params": base_params}, tokens, segment_ids=segment_ids)
        valid = segment_ids != 0
        per_token = jnp.where(valid, token_kl(logits, base_logits), 0.0)
        return jnp.sum(per_token), jnp.max(per_token)

    return kl


@dataclasses.dataclass(frozen=True)
class KLResult:
    """Mean (over the probe's real tokens) and largest token KL to the base."""

    mean: float
    max: float
    tokens: int


def probe_kl(cfg: ModelConfig, params, base_params, probe: Probe, batch_size: int = 8
             ) -> KLResult:
    """`KL(checkpoint || base)` per token on `probe`, exact over the vocabulary."""
    fn = _kl_fn(cfg)
    total, largest = 0.0, 0.0
    n = probe.tokens.shape[0]
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        tokens, seg = probe.tokens[rows], probe.segment_ids[rows]
        if tokens.shape[0] < batch_size:  # one compiled shape: pad with all-padding rows
            fill = batch_size - tokens.shape[0]
            tokens = np.concatenate([tokens, np.repeat(tokens[:1], fill, 0)])
            seg = np.concatenate([seg, np.zeros((fill, seg.shape[1]), np.int32)])
        s, m = fn(params, base_params, tokens, seg)
        total += float(s)
        largest = max(largest, float(m))
    return KLResult(total / max(probe.num_tokens, 1), largest, probe.num_tokens)


def kl_config(cfg: ModelConfig) -> ModelConfig:
    """The config the KL runs under: float32 numerics, no LoRA branch (weights are merged)."""
    return cfg.replace(dtype="float32", param_dtype="float32", lora_scale=0.0,
                       lora_dropout=0.0, remat_policy="none")


__all__ = ["KLResult", "Probe", "kl_config", "probe_from_ids", "probe_kl", "read_probe_file",
           "sample_probe"]
