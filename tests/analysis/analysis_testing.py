"""Shared pieces of the analysis tests: tiny random params without compiling Flax's init."""

import jax
import numpy as np

from jaxpost.models import param_shapes


def random_params(cfg, seed: int = 0, zero_biases: bool = True) -> dict:
    """Params shaped like `init_params(cfg)`: normal(0, 0.02) kernels/embeddings, ones for
    norm scales, zeros for biases (as the model initialises them) unless told otherwise."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(s.shape, np.float32)
        if name == "bias" and zero_biases:
            return np.zeros(s.shape, np.float32)
        return (0.02 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))
