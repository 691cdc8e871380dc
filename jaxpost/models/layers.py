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


def _matmul_2d(x: jax.Array, w: jax.Array, *, transposed_weight_grad: bool = False,
               w_out_in: bool = False) -> jax.Array:
    """`x [..., in] @ w [in, out]` through a 2-D view of x [prod(...), in].

    The same product, but its weight gradient is then one plain `x2ᵀ · dy2` contraction:
    over a [B, T, in] operand XLA:CPU lays the activation gradient out transposed and
    copies it before every weight-gradient matmul (a tiny-llama MLP block's backward
    ran ~30% slower). Leading axes merge batch-major, so a batch sharding carries over.
    `transposed_weight_grad`: the product of `matmul_transposed_weight_grad`.
    `w_out_in`: w is given as its transpose [out, in] (`x2 · wᵀ`).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if w_out_in:
        y = jax.lax.dot_general(x2, w, (((1,), (1,)), ((), ())))
        return y.reshape(lead + (w.shape[0],))
    y = matmul_transposed_weight_grad(x2, w) if transposed_weight_grad else jnp.dot(x2, w)
    return y.reshape(lead + (w.shape[-1],))


@jax.custom_vjp
def matmul_transposed_weight_grad(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [M, in] @ w [in, out]` whose weight gradient is the plain product `xᵀ · dy` of
    a materialised transpose of x.

    Left to itself, XLA:CPU contracts the weight gradient over the rows of both operands
    (`lhs_contracting_dims={0}`), which it runs on Eigen beside the YNNPACK matmul of the
    input gradient: for the output head of a W-SFT step ([1024, 512] rows, 16384 outputs)
    at ~74 GFLOP/s standalone against ~145 for the same product on a transposed copy of
    x, and the head's backward took ~316 ms of a ~2 s step against ~210 ms this way.
    The copy is [in, M], small beside the [M, out] operands; the optimization barrier
    keeps XLA from folding the transpose back into the dot. Exact: the same products.
    A custom VJP has no forward-mode rule: `jax.jvp` / `jax.jacfwd` through the head
    on CPU raise (reverse mode, which training and `jax.grad` use, is unaffected).
    """
    return jnp.dot(x, w)


def _matmul_twg_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _matmul_twg_bwd(res, dy):
    x, w = res
    dx = jax.lax.dot_general(dy, w.astype(dy.dtype), (((1,), (1,)), ((), ())))
    xt = jax.lax.optimization_barrier(jnp.transpose(x))
    dw = jnp.dot(xt, dy.astype(x.dtype))
    return dx.astype(x.dtype), dw.astype(w.dtype)


matmul_transposed_weight_grad.defvjp(_matmul_twg_fwd, _matmul_twg_bwd)


def kernel_out_in(module_params: dict, dtype: str | jnp.dtype | None = None) -> dict:
    """A `Linear`'s params with `kernel` [in, out] replaced by `kernel_t` [out, in], a
    materialised transpose (cast to `dtype` if given): the same outputs, another layout
    for the matmul. Inside `jit` the optimization barrier keeps XLA from folding the
    transpose back into the product; make it once per call, outside any decode loop.

    The barrier holds the transpose flattened: a 1-D array has one memory layout, so XLA's
    layout assignment cannot turn the transpose into a bitcast of the [in, out] slice and
    then give each reader (the prefill, the decode loop) its own transposing copy; with
    the barrier on the 2-D transpose it did, and the sampler's temporaries held ~1.4
    copies of the kernels beyond the plain per-layer slices instead of at most one."""
    out = dict(module_params)
    kernel = out.pop("kernel")
    if dtype is not None:
        kernel = kernel.astype(dtype)
    kernel_t = jnp.transpose(kernel)
    flat = jax.lax.optimization_barrier(kernel_t.reshape(-1))
    out["kernel_t"] = flat.reshape(kernel_t.shape)
    return out


class Linear(nn.Module):
    """`x @ kernel (+ bias)` with kernel [in, out]; HF stores the transpose as `weight`.

    The kernel may instead be given as its transpose, a `kernel_t` [out, in] leaf in
    place of `kernel` (`kernel_out_in`): the sampler's per-call copy of every kernel on
    CPU, where XLA:CPU streams a [16, 512] x [512, 16384] decode product's weights from
    [in, out] at half the rate of the same product from [out, in].

    LoRA: when this module's params also hold `lora_a` [in, r] and `lora_b` [r, out]
    (leaves added next to the kernel by `jaxpost.peft.lora`; `init` never creates them),
    the output gains `cfg.lora_scale · (dropout(x) · A) · B` (summed over further pairs
    `lora_a_<name>`/`lora_b_<name>`, e.g. AlignGuard's alignment adapter), computed in the compute
    dtype without materialising a merged kernel, so the base kernel can stay frozen and
    the same module serves training, sampling and scoring. Dropout (rate
    `cfg.lora_dropout`, as PEFT's `lora_dropout`) applies only when the caller passes an
    rng named "dropout"; without one the forward pass is deterministic.
    """

    features: int
    axes: tuple[str, str]  # logical names of (in, out)
    cfg: ModelConfig
    use_bias: bool = False
    # The kernel's gradient as a plain product on a transposed copy of the input
    # (`matmul_transposed_weight_grad`): the output head's, on CPU.
    transposed_weight_grad: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        if self.has_variable("params", "kernel_t"):
            kernel_t = self.get_variable("params", "kernel_t")
            y = _matmul_2d(x.astype(dtype), kernel_t.astype(dtype), w_out_in=True)
        else:
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.initializer_range), self.axes),
                (x.shape[-1], self.features), dtype_of(cfg.param_dtype))
            y = _matmul_2d(x.astype(dtype), kernel.astype(dtype),
                           transposed_weight_grad=self.transposed_weight_grad)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                (self.features,), dtype_of(cfg.param_dtype))
            y = y + bias.astype(dtype)
        pairs = self._adapter_pairs()
        if pairs:
            y = y + self._lora(x, pairs, dtype)
        return y

    def _adapter_pairs(self) -> list[tuple[str, str]]:
        """`(lora_a{sfx}, lora_b{sfx})` names of this module's adapter pairs: `lora_a`/
        `lora_b`, and further pairs `lora_a_<name>`/`lora_b_<name>` (AlignGuard's second
        adapter); a factor without its partner is an error."""
        names = self.variables.get("params", {}).keys()
        factors = {n for n in names if n in ("lora_a", "lora_b")
                   or n.startswith(("lora_a_", "lora_b_"))}
        where = "/".join(self.path)
        pairs = []
        for sfx in sorted({n[len("lora_a"):] for n in factors}):
            present = [n for n in (f"lora_a{sfx}", f"lora_b{sfx}") if n in factors]
            if len(present) != 2:
                absent = ({f"lora_a{sfx}", f"lora_b{sfx}"} - set(present)).pop()
                raise ValueError(f"params of {where} hold {present[0]} but no {absent}: a LoRA "
                                 "adapter needs both (see jaxpost.peft.lora.init_adapters)")
            pairs.append((f"lora_a{sfx}", f"lora_b{sfx}"))
        return pairs

    def _lora(self, x: jax.Array, pairs, dtype) -> jax.Array:
        """`lora_scale · Σ_pairs (dropout(x) · A) · B` for this module's adapter leaves
        (one dropout mask shared by the pairs, as for one adapter of the summed rank)."""
        cfg, where = self.cfg, "/".join(self.path)
        if cfg.lora_scale == 0.0:
            raise ValueError(
                f"params of {where} hold LoRA adapters (lora_a/lora_b) but "
                "ModelConfig.lora_scale is 0, which would silently ignore them; set it to "
                "the adapter's scale (jaxpost.peft.lora.LoraConfig.scale: alpha/r, or "
                "alpha/sqrt(r) with rslora), or remove the adapters (strip_adapters / "
                "merge_adapters)")
        h = x.astype(dtype)
        if cfg.lora_dropout > 0.0 and self.has_rng("dropout"):
            keep = 1.0 - cfg.lora_dropout
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, h.shape)
            h = jnp.where(mask, h / jnp.asarray(keep, dtype), jnp.zeros((), dtype))
        out = None
        for a_name, b_name in pairs:
            a = self.get_variable("params", a_name)
            b = self.get_variable("params", b_name)
            term = _matmul_2d(_matmul_2d(h, a.astype(dtype)), b.astype(dtype))
            out = term if out is None else out + term
        return out * jnp.asarray(cfg.lora_scale, dtype)


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


def dropout_rngs(cfg: ModelConfig, rng: jax.Array | None) -> dict | None:
    """The `rngs` of a training forward pass: `{"dropout": rng}` when the model has LoRA
    dropout and an rng is given, else None (evaluation, sampling, reference passes)."""
    if rng is None or cfg.lora_dropout <= 0.0:
        return None
    return {"dropout": rng}
