"""jaxpost: post-training of decoder-only LLMs in JAX/Flax (SFT, GRPO, LoRA, freezing)."""

__version__ = "0.1.0"
