"""Pure-functional Llama / Qwen2 / Qwen3 transformers and their HF conversion."""

from jaxpost.models.attention import KVCache
from jaxpost.models.config import (
    PRESETS, SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling, UnsupportedModelError, preset,
    tiny)
from jaxpost.models.hf import HFCheckpointError, from_hf, to_hf
from jaxpost.models.logprobs import token_kl, token_logprobs, vocab_logprobs
from jaxpost.models.transformer import (
    Transformer, embed_tokens, head_logits, init_params, param_logical_axes, param_shapes,
    unstack_layer_params)

__all__ = [
    "KVCache", "ModelConfig", "PRESETS", "RopeScaling", "SUPPORTED_ARCHITECTURES", "Transformer",
    "UnsupportedModelError", "embed_tokens", "head_logits", "init_params", "param_logical_axes",
    "param_shapes", "preset", "tiny", "HFCheckpointError", "from_hf", "to_hf", "token_kl",
    "token_logprobs", "unstack_layer_params", "vocab_logprobs",
]
