"""What the analysis compares: checkpoint specs, and their params through the existing
openers (`jaxpost.models.from_hf` for Hugging Face folders; `jaxpost.checkpoint.open_run`
and `RunCheckpoint.restore_params` for jaxpost workdirs, which merges LoRA adapters).

A spec is a Hugging Face folder (`config.json` + safetensors), or a training workdir
(`checkpoints/` inside) as `DIR` (its latest step), `DIR@STEP`, or `DIR@all` (every step,
ascending). Each resolves to one or more `ModelRef`s; `load` reads one at a time, so only
the base and one checkpoint are in memory together.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxpost.checkpoint import CHECKPOINTS, open_run
from jaxpost.models import ModelConfig, from_hf, param_shapes
from jaxpost.models.hf import CONFIG_FILE

HF, RUN = "hf", "run"


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """One model to read: a Hugging Face folder, or one step of a training workdir."""

    path: str
    kind: str  # HF or RUN
    step: int | None = None  # RUN: the checkpoint step
    series: str = ""  # what trajectories group by: the folder's name

    @property
    def label(self) -> str:
        """How tables and plots name it: `NAME` or `NAME@STEP`."""
        return self.series if self.step is None else f"{self.series}@{self.step}"


def _kind(path: str) -> str:
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        return RUN
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return HF
    raise FileNotFoundError(
        f"{path!r} is neither a jaxpost workdir (no {CHECKPOINTS}/ folder) nor a Hugging "
        f"Face folder (no {CONFIG_FILE})")


def _name(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or path


def resolve(spec: str, what: str = "checkpoint") -> list[ModelRef]:
    """The models a spec stands for (see the module docstring; `what` names the flag).

    Raises:
      FileNotFoundError / ValueError: naming the spec.
    """
    path, at, step_text = spec.partition("@")
    if not path:
        raise ValueError(f"{what} spec {spec!r} has no path")
    kind = _kind(path)
    if kind == HF:
        if at:
            raise ValueError(f"{what} spec {spec!r}: @STEP and @all apply to jaxpost workdirs; "
                             f"{path} is a Hugging Face folder")
        return [ModelRef(path, HF, None, _name(path))]
    if at and step_text != "all" and not step_text.isdigit():
        raise ValueError(f"{what} spec {spec!r}: expected DIR, DIR@STEP or DIR@all")
    with open_run(path, int(step_text) if step_text.isdigit() else None) as run:
        steps = run.all_steps() if step_text == "all" else [run.step]
    return [ModelRef(path, RUN, s, _name(path)) for s in steps]


def _architecture(cfg: ModelConfig) -> ModelConfig:
    """The fields that fix the params' meaning (numerics and LoRA switched off)."""
    return cfg.replace(dtype="float32", param_dtype="float32", scan_layers=True,
                       remat_policy="none", lora_scale=0.0, lora_dropout=0.0,
                       initializer_range=0.02, eos_token_ids=(), bos_token_id=None,
                       max_position_embeddings=0)


def load(ref: ModelRef) -> tuple[ModelConfig, Any, str | None]:
    """(model config, float32 params on the first device, tokenizer spec or None).

    A workdir's params come from `RunCheckpoint.restore_params`, so a LoRA run is read as
    its merged weights; the tokenizer is the run's `data.tokenizer` / `prompts.tokenizer`.
    An HF folder's tokenizer is the folder itself when it holds one.
    """
    if ref.kind == HF:
        cfg, params = from_hf(ref.path, jnp.float32)
        has_tok = any(os.path.isfile(os.path.join(ref.path, f))
                      for f in ("tokenizer.json", "tokenizer.model"))
        return cfg, params, ref.path if has_tok else None
    with open_run(ref.path, ref.step) as run:
        metadata = run.metadata()
        if "reward_model" in metadata:
            raise ValueError(f"{ref.path} (step {ref.step}) is a reward-model run; the "
                             "analysis compares language models")
        cfg = run.model_config()
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
                                param_shapes(cfg.replace(param_dtype="float32")))
        params = run.restore_params(abstract, jax.tree.map(lambda _: device, abstract))
    config = metadata.get("config") or {}
    tokenizer = None
    for section in ("data", "prompts"):
        tokenizer = tokenizer or (config.get(section) or {}).get("tokenizer")
    return cfg.replace(param_dtype="float32", lora_scale=0.0, lora_dropout=0.0), params, tokenizer


def check_same_architecture(base: ModelConfig, other: ModelConfig, label: str) -> None:
    """Raises ValueError naming the differing fields when `other` is another architecture."""
    a, b = (dataclasses.asdict(_architecture(c)) for c in (base, other))
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        raise ValueError(f"{label} is another architecture than the base: " + ", ".join(
            f"{k} {b[k]!r} (base {a[k]!r})" for k in diff))


__all__ = ["HF", "RUN", "ModelRef", "check_same_architecture", "load", "resolve"]
