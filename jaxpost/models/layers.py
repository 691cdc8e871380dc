"""Building blocks with logical axis names: projections, RMSNorm, SwiGLU MLP.

Every parameter is created through `nn.with_logical_partitioning`, so `jaxpost.sharding`
can map its logical axes to mesh axes; activations are constrained with logical names
(a no-op outside a `sharding.logical_rules` context).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpost.models.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Shards an activation by logical axis names (no-op without logical rules)."""
    return nn.with_logical_constraint(x, tuple(names))


class Linear(nn.Module):
    """`x @ kernel (+ bias)` with kernel [in, out]; HF stores the transpose as `weight`."""

    features: int
    axes: tuple[str, str]  # logical names of (in, out)
    cfg: ModelConfig
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), self.axes),
            (x.shape[-1], self.features), dtype_of(cfg.param_dtype))
        dtype = dtype_of(cfg.dtype)
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                (self.features,), dtype_of(cfg.param_dtype))
            y = y + bias.astype(dtype)
        return y


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as in HF's LlamaRMSNorm (`scale` is HF's `weight`)."""

    eps: float
    cfg: ModelConfig
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],), dtype_of(self.cfg.param_dtype))
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        dtype = dtype_of(self.cfg.dtype)
        return scale.astype(dtype) * xf.astype(dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        gate = Linear(cfg.intermediate_size, ("embed", "mlp"), cfg, name="gate_proj")(x)
        up = Linear(cfg.intermediate_size, ("embed", "mlp"), cfg, name="up_proj")(x)
        h = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return Linear(cfg.hidden_size, ("mlp", "embed"), cfg, name="down_proj")(h)
