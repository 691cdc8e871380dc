"""Which platform ("cpu", "gpu", "tpu") jaxpost's per-platform choices follow.

Unrolled layers, the output head's weight gradient and the sampler's per-layer [out, in]
copy are CPU-only choices; they all ask `platform()`, so they agree with each other. No
jaxpost imports: the models, the sampler and the configs all use it.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh


def platform(mesh: Mesh | None = None) -> str:
    """`mesh`'s devices' platform; without one, that of the mesh being traced under
    (`sharding.logical_rules`, `jax.set_mesh`); else JAX's default backend. So a CPU mesh
    under a GPU default backend gets the CPU choices everywhere."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


__all__ = ["platform"]
