"""jaxpost/models/layers.py: `Linear` over inputs of any rank, with bias and LoRA pairs."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models import preset
from jaxpost.models.layers import Linear, kernel_out_in, matmul_transposed_weight_grad


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


class TransposedWeightGradTest(chex.TestCase):
    """`matmul_transposed_weight_grad` (the output head's product on CPU) is `x @ w` with
    the same gradients, only computed as different products: NumPy's `dy · wᵀ` and
    `xᵀ · dy`, through `Linear` with bias and LoRA too, and a frozen kernel gets none."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_value_and_gradients_match_numpy(self):
        r = np.random.default_rng(0)
        x = r.standard_normal((12, 6)).astype(np.float32)
        w = r.standard_normal((6, 9)).astype(np.float32)
        c = r.standard_normal((12, 9)).astype(np.float32)
        y = self.variant(matmul_transposed_weight_grad)(x, w)
        chex.assert_shape(y, (12, 9))
        chex.assert_trees_all_close(y, x @ w, atol=1e-5, rtol=1e-5)
        dx, dw = self.variant(jax.grad(
            lambda x, w: jnp.sum(matmul_transposed_weight_grad(x, w) * c), argnums=(0, 1)))(x, w)
        chex.assert_trees_all_close(dx, c @ w.T, atol=1e-4, rtol=1e-5)
        chex.assert_trees_all_close(dw, x.T @ c, atol=1e-4, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_linear_gradients_equal_the_plain_products(self):
        cfg = preset("tiny-llama", lora_scale=0.5)
        p = _params(3, 6, 5, bias=True, rank=2)
        x = np.random.default_rng(7).standard_normal((2, 3, 6)).astype(np.float32)
        c = np.random.default_rng(8).standard_normal((2, 3, 5)).astype(np.float32)
        grads = []
        for transposed in (False, True):
            module = Linear(5, ("embed", "mlp"), cfg, use_bias=True,
                            transposed_weight_grad=transposed)
            grads.append(self.variant(jax.grad(
                lambda p, x: jnp.sum(module.apply({"params": p}, x) * c), argnums=(0, 1)))(p, x))
        chex.assert_trees_all_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(grads[1][0]["kernel"],
                                    x.reshape(-1, 6).T @ c.reshape(-1, 5), atol=1e-4, rtol=1e-5)

    def test_frozen_kernel_computes_no_weight_gradient(self):
        # LoRA on a frozen head: the kernel's gradient is dead code, and XLA drops it (no
        # product of the kernel's shape is left in the compiled backward); differentiated,
        # the kernel's gradient is such a product (the check can fail).
        cfg = preset("tiny-llama", lora_scale=0.5)
        p = _params(4, 48, 80, bias=False, rank=2)
        x = np.random.default_rng(9).standard_normal((2, 16, 48)).astype(np.float32)
        module = Linear(80, ("embed", "vocab"), cfg, transposed_weight_grad=True)
        product = re.compile(r"= f32\[48,80\]\{[0-9,]*\} (dot|fusion|custom-call)\(")

        def loss(adapters, kernel):
            return jnp.sum(module.apply({"params": {"kernel": kernel, **adapters}}, x) ** 2)

        adapters = {k: v for k, v in p.items() if k != "kernel"}
        frozen = jax.jit(jax.grad(loss)).lower(adapters, p["kernel"]).compile().as_text()
        trained = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
            adapters, p["kernel"]).compile().as_text()
        assert not product.search(frozen), "the frozen kernel's gradient was computed"
        assert product.search(trained)
        grad = jax.jit(jax.grad(loss))(adapters, p["kernel"])
        chex.assert_tree_all_finite(grad)
        chex.assert_shape(grad["lora_a"], (48, 2))


class KernelOutInTest(chex.TestCase):
    """A kernel given as its transpose (`kernel_t` [out, in], the sampler's CPU layout) is
    the same `Linear`: outputs and input gradients equal NumPy's with bias and LoRA, and the
    compiled product reads the [out, in] copy (XLA does not fold the transpose back)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_outputs_and_input_gradient_match_numpy(self):
        cfg = preset("tiny-llama", lora_scale=0.5)
        for shape, bias, rank in [((3, 6), True, 0), ((2, 3, 6), False, 2)]:
            p = _params(len(shape), 6, 5, bias=bias, rank=rank)
            q = kernel_out_in(p)
            assert "kernel" not in q and set(p) - {"kernel"} <= set(q)
            chex.assert_shape(q["kernel_t"], (5, 6))
            x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
            c = np.random.default_rng(4).standard_normal(shape[:-1] + (5,)).astype(np.float32)
            module = Linear(5, ("embed", "mlp"), cfg, use_bias=bias)
            y = self.variant(lambda q, x: module.apply({"params": q}, x))(q, x)
            chex.assert_trees_all_close(y, _reference(p, x, 0.5), atol=1e-5, rtol=1e-5)
            dx = self.variant(jax.grad(
                lambda x: jnp.sum(module.apply({"params": q}, x) * c)))(x)
            w = p["kernel"] + (0.5 * p["lora_a"] @ p["lora_b"] if rank else 0)
            chex.assert_trees_all_close(dx, c @ w.T, atol=1e-4, rtol=1e-5)

    def test_the_compiled_product_reads_the_transposed_copy(self):
        cfg = preset("tiny-llama")
        p = _params(0, 48, 80, bias=False, rank=0)
        x = np.ones((16, 48), np.float32)
        module = Linear(80, ("embed", "vocab"), cfg)

        def hlo(layout):
            return jax.jit(lambda p, x: module.apply({"params": layout(p)}, x)).lower(
                p, x).compile().as_text()

        dot = re.compile(r"rhs_contracting_dims=\{(\d)\}")
        assert set(dot.findall(hlo(lambda p: p))) == {"0"}  # [in, out]: contract its rows
        assert set(dot.findall(hlo(kernel_out_in))) == {"1"}  # [out, in]: its columns
