"""Model configuration for the Llama 3.x, Qwen2/2.5 and Qwen3 families.

`ModelConfig` is the one description of a decoder-only transformer that the model, the
HF converter, the sharding helpers and the sampler share. `from_hf_config` /
`to_hf_config` translate to and from a Hugging Face `config.json` dictionary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

#: HF `architectures` names jaxpost can load, mapped to the family they belong to.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_FAMILY_TO_ARCH = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
FAMILIES = tuple(_FAMILY_TO_ARCH)
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


class UnsupportedModelError(ValueError):
    """A config.json describes a model jaxpost cannot represent."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x frequency-dependent RoPE scaling (HF `rope_type="llama3"`)."""

    factor: float = 8.0  # how much the context was extended
    low_freq_factor: float = 1.0  # wavelengths above original/low are divided by factor
    high_freq_factor: float = 4.0  # wavelengths below original/high are kept
    original_max_position_embeddings: int = 8192  # context length of the pre-trained model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus numerics of one decoder-only transformer.

    The three families differ only in flags: Qwen2 adds q/k/v biases (`attention_bias`),
    Qwen3 adds per-head RMSNorm on queries and keys (`qk_norm`), Llama 3.x may scale RoPE.
    """

    family: str  # "llama", "qwen2" or "qwen3"
    vocab_size: int
    hidden_size: int  # d_model
    intermediate_size: int  # SwiGLU inner width
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA groups); == num_heads for plain MHA
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # Llama 3.x only
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False  # lm_head shares embed_tokens
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2: True)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # generation stops on any of these
    initializer_range: float = 0.02  # std of the normal init for random models
    param_dtype: str = "float32"  # storage dtype of parameters (master weights)
    dtype: str = "float32"  # compute dtype of activations and matmuls
    # lax.scan over layers (fast compile) or unrolled; None: unrolled on CPU, where XLA
    # copies each layer's weights out of the stack at every scan step, scanned elsewhere
    scan_layers: bool | None = None
    remat_policy: str = "none"  # activation checkpointing per layer, see REMAT_POLICIES
    # LoRA (jaxpost.peft.lora): a Linear whose params hold `lora_a`/`lora_b` adds
    # lora_scale·(dropout(x)·A)·B. Static numerics of the forward pass, never in config.json.
    lora_scale: float = 0.0  # s = alpha/r (alpha/sqrt(r) with rslora); 0: no adapters expected
    lora_dropout: float = 0.0  # dropout on a LoRA branch's input, only with a "dropout" rng

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family={self.family!r}; expected one of {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"ModelConfig.remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if not math.isfinite(self.lora_scale):
            raise ValueError(f"ModelConfig.lora_scale={self.lora_scale} must be finite")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(
                f"ModelConfig.lora_dropout={self.lora_dropout}: expected a rate in [0, 1)")
        if isinstance(self.eos_token_ids, list):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def scans_layers(self, platform: str | None = None) -> bool:
        """Whether the layers run under `lax.scan`: `scan_layers`, or when it is None,
        everywhere but on CPU (`platform`, default: `jaxpost.platform.platform()`)."""
        if self.scan_layers is not None:
            return bool(self.scan_layers)
        from jaxpost.platform import platform as current  # the config module stays JAX-free
        return (platform or current()) != "cpu"

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "ModelConfig":
        """Inverse of `dataclasses.asdict` (e.g. a config stored in checkpoint metadata)."""
        fields = dict(fields)
        if fields.get("rope_scaling"):
            fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
        fields["eos_token_ids"] = tuple(fields.get("eos_token_ids") or ())
        return cls(**fields)

    @property
    def num_params(self) -> int:
        """Number of parameters (embedding counted once when tied)."""
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                           self.num_kv_heads, self.head_dim)
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.attention_bias:
            attn += h * hd + 2 * kv * hd
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + head + self.num_layers * layer + d

    # ------------------------------------------------------------------ RoPE
    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies [head_dim // 2], with Llama 3 scaling applied."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** exponents)
        s = self.rope_scaling
        if s is None:
            return inv_freq.astype(np.float32)
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                  / (s.high_freq_factor - s.low_freq_factor))
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    # ------------------------------------------------------------- HF config
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` dictionary.

        Reads both the transformers 4 form (top-level `rope_theta`, `rope_scaling`) and the
        transformers 5 form (`rope_parameters`).
        """
        archs = hf.get("architectures") or []
        family = None
        for arch in archs:
            family = SUPPORTED_ARCHITECTURES.get(arch)
            if family:
                break
        if family is None and not archs and hf.get("model_type") in FAMILIES:
            family = hf["model_type"]
        if family is None:
            raise UnsupportedModelError(
                f"config.json architectures={archs or None} model_type={hf.get('model_type')!r} "
                f"is not supported; supported architectures: {sorted(SUPPORTED_ARCHITECTURES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(
                f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("config.json mlp_bias=true is not supported")
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(
                "config.json use_sliding_window=true is not supported (full attention only)")

        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling_src = rope if rope.get("rope_type", rope.get("type")) not in (None, "default") else legacy
        rope_type = scaling_src.get("rope_type", scaling_src.get("type")) if scaling_src else None
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(scaling_src["factor"]),
                low_freq_factor=float(scaling_src["low_freq_factor"]),
                high_freq_factor=float(scaling_src["high_freq_factor"]),
                original_max_position_embeddings=int(
                    scaling_src["original_max_position_embeddings"]))
        elif rope_type not in (None, "default"):
            raise UnsupportedModelError(
                f"config.json rope type {rope_type!r} is not supported; supported: default, llama3")

        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        num_heads = hf["num_attention_heads"]
        kwargs = dict(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if family == "qwen2" else bool(hf.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dictionary for this model."""
        hf: dict[str, Any] = {
            "architectures": [_FAMILY_TO_ARCH[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_embeddings,
            "initializer_range": self.initializer_range,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
        }
        if self.family == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        elif self.family == "qwen2":
            hf["use_sliding_window"] = False
        else:
            hf["attention_bias"] = self.attention_bias
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            hf["eos_token_id"] = (self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                                  else list(self.eos_token_ids))
        return hf


# ---------------------------------------------------------------------------- presets
def tiny(family: str = "llama", **overrides: Any) -> ModelConfig:
    """A small random model for tests and demos (hidden 64, 2 layers, GQA 4:2)."""
    base = dict(
        family=family, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=512, attention_bias=family == "qwen2", qk_norm=family == "qwen3",
    )
    base.update(overrides)
    return ModelConfig(**base)


PRESETS: dict[str, dict[str, Any]] = {
    # Shapes of published checkpoints; load weights with `from_hf` on a local folder.
    "llama3.2-1b": dict(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        max_position_embeddings=131072, tie_embeddings=True, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009)),
    "llama3.1-8b": dict(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009)),
    "qwen2.5-0.5b": dict(
        family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=32768, tie_embeddings=True,
        attention_bias=True, eos_token_ids=(151645, 151643)),
    "qwen3-0.6b": dict(
        family="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, tie_embeddings=True,
        qk_norm=True, eos_token_ids=(151645, 151643)),
    # The benchmark model of ../shared/BENCHMARKS.md.
    "tiny-llama": dict(
        family="llama", vocab_size=16384, hidden_size=512, intermediate_size=1536,
        num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=1024),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` by preset name (see `PRESETS`), with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
