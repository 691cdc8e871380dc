"""The train state: one pytree holding everything a step reads and writes."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxpost.peft.partition import combine


@flax.struct.dataclass
class TrainState:
    """step, trainable params and their optimizer state, frozen params, and the rng.

    `frozen` is an argument of the jitted step like everything else here (never closed
    over: a closure would become a constant of the compiled program); the optimizer and
    its state cover `trainable` only. `params` is the combined tree the objective sees.
    """

    step: jax.Array  # int32 scalar: optimizer steps taken
    trainable: Any  # params the optimizer updates (nested dicts)
    frozen: Any  # params it never touches (nested dicts, disjoint from trainable)
    opt_state: Any
    rng: jax.Array  # uint32 key data; `jax.random.wrap_key_data(rng)` gives the key

    @property
    def params(self):
        """The full params: `combine(frozen, trainable)` (no copy)."""
        return combine(self.frozen, self.trainable)

    @classmethod
    def create(cls, trainable, optimizer: optax.GradientTransformation, seed: int,
               frozen=None) -> "TrainState":
        """A step-0 state; without `frozen`, every parameter trains."""
        return cls(step=jnp.zeros((), jnp.int32), trainable=trainable,
                   frozen={} if frozen is None else frozen,
                   opt_state=optimizer.init(trainable),
                   rng=jax.random.key_data(jax.random.key(seed)))
