"""The train state: one pytree holding everything a step reads and writes."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """step, params, optimizer state and the rng (raw uint32 key data, checkpointable)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data; `jax.random.wrap_key_data(rng)` gives the key

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, seed: int) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   rng=jax.random.key_data(jax.random.key(seed)))
