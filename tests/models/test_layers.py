"""jaxpost/models/layers.py: `Linear` over inputs of any rank, with bias and LoRA pairs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models import preset
from jaxpost.models.layers import Linear


def _params(rng, d_in, d_out, *, bias, rank):
    r = np.random.default_rng(rng)
    p = {"kernel": r.standard_normal((d_in, d_out)).astype(np.float32)}
    if bias:
        p["bias"] = r.standard_normal((d_out,)).astype(np.float32)
    if rank:
        p["lora_a"] = r.standard_normal((d_in, rank)).astype(np.float32)
        p["lora_b"] = r.standard_normal((rank, d_out)).astype(np.float32)
    return p


def _reference(p, x, scale):
    """NumPy: x @ W (+ b) (+ scale * x @ A @ B), over the last axis of x."""
    y = x @ p["kernel"]
    if "bias" in p:
        y = y + p["bias"]
    if "lora_a" in p:
        y = y + scale * (x @ p["lora_a"]) @ p["lora_b"]
    return y


class LinearTest(chex.TestCase):
    """The 2-D view `Linear` contracts through keeps every leading axis and the maths: the
    output and the kernel's gradient equal NumPy's for inputs of rank 1 to 4."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_any_rank_with_bias_and_lora_matches_numpy(self):
        cfg = preset("tiny-llama", lora_scale=0.5)
        d_in, d_out = 6, 5
        for shape, bias, rank in [((d_in,), False, 0), ((3, d_in), True, 0),
                                  ((2, 3, d_in), False, 2), ((2, 1, 3, d_in), True, 3)]:
            p = _params(len(shape), d_in, d_out, bias=bias, rank=rank)
            x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
            module = Linear(d_out, ("embed", "mlp"), cfg, use_bias=bias)
            fn = self.variant(lambda p, x: module.apply({"params": p}, x))
            y = fn(p, x)
            chex.assert_shape(y, shape[:-1] + (d_out,))
            chex.assert_trees_all_close(y, _reference(p, x, 0.5), atol=1e-5, rtol=1e-5)

            # d sum(y * c) / d kernel = x2ᵀ · c2 over the flattened leading axes.
            c = np.random.default_rng(8).standard_normal(shape[:-1] + (d_out,)).astype(np.float32)
            grad = self.variant(jax.grad(
                lambda p: jnp.sum(module.apply({"params": p}, x) * c)))(p)
            expected = x.reshape(-1, d_in).T @ c.reshape(-1, d_out)
            chex.assert_trees_all_close(grad["kernel"], expected, atol=1e-4, rtol=1e-5)
            chex.assert_tree_all_finite(grad)
