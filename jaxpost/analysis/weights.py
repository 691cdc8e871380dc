"""Per-(layer, module) weight change between a base model and a fine-tuned one.

Every parameter tensor is keyed by its layer (None outside the layer stack) and its module,
read off the tensor's Hugging Face name (`jaxpost.models.hf.hf_name`):
`model.layers.12.self_attn.q_proj.weight` -> (12, "q_proj"), its bias -> (12,
"q_proj.bias"), `model.embed_tokens.weight` -> (None, "embed_tokens"), `lm_head.weight`
-> (None, "lm_head"). Stacked layer params are split per layer, so a row is one layer's
matrix whatever the layout.

For each tensor (ALGORITHMS.md §3): `abs = ‖W − W₀‖_F`, `rel = abs / ‖W₀‖_F`,
`rms = abs / sqrt(numel)`. GQA models have smaller k/v projections than q, so compare
modules by `rel` or `rms`, never by `abs`. Sums of squares are accumulated in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models.hf import hf_name, is_stacked

#: Modules in the order tables and heatmaps list them (others follow, sorted).
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "gate_proj",
                "up_proj", "down_proj", "input_layernorm", "post_attention_layernorm",
                "embed_tokens", "norm", "lm_head")
_ADAPTER_LEAVES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One model tensor of one layer: where it sits and its value (params layout)."""

    layer: int | None  # index in the layer stack; None outside it
    module: str  # "q_proj", "q_proj.bias", "embed_tokens", "norm", ...
    value: Any  # jax.Array or np.ndarray; a Linear kernel is [in, out]
    is_kernel: bool  # a Linear kernel (its HF weight is the transpose)

    def hf_matrix(self) -> Any:
        """The tensor in Hugging Face orientation: a kernel `[in, out]` as `W [out, in]`."""
        return self.value.T if self.is_kernel else self.value


def module_of(name: str) -> tuple[int | None, str]:
    """(layer, module) of a Hugging Face tensor name (see the module docstring)."""
    parts = name.split(".")
    layer = None
    if parts[:2] == ["model", "layers"]:
        layer, parts = int(parts[2]), parts[3:]
    elif parts[:1] == ["model"]:
        parts = parts[1:]
    *modules, leaf = parts
    module = modules[-1] if modules else leaf
    return layer, module if leaf == "weight" else f"{module}.{leaf}"


def iter_tensors(params: Mapping) -> Iterator[Tensor]:
    """Every tensor of a (merged, adapter-free) params tree, stacked leaves split per layer.

    Raises:
      ValueError: the tree still holds LoRA adapters (merge them first, as
        `RunCheckpoint.restore_params` does).
    """
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(str(getattr(k, "key", k)) for k in key_path)
        if path[-1] in _ADAPTER_LEAVES:
            raise ValueError(f"params leaf {'/'.join(path)} is a LoRA adapter; analyse merged "
                             "weights (jaxpost.peft.lora.merge_adapters)")
        is_kernel = path[-1] == "kernel"
        if is_stacked(path):
            for i in range(np.shape(leaf)[0]):
                yield Tensor(*module_of(hf_name(path, i)), leaf[i], is_kernel)
        else:
            yield Tensor(*module_of(hf_name(path)), leaf, is_kernel)


def change_norms(w0: jax.Array, w: jax.Array, axis=None) -> tuple[jax.Array, jax.Array]:
    """(‖w − w0‖_F, ‖w0‖_F) in float32, over `axis` (None: the whole tensor)."""
    w0, w = jnp.asarray(w0, jnp.float32), jnp.asarray(w, jnp.float32)
    return (jnp.sqrt(jnp.sum(jnp.square(w - w0), axis=axis)),
            jnp.sqrt(jnp.sum(jnp.square(w0), axis=axis)))


def _path(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in key_path)


@jax.jit
def tree_change_norms(base: Mapping, tuned: Mapping) -> Any:
    """`change_norms` of every leaf in one compiled program: per leaf a pair of arrays,
    [L] for a stacked leaf (one value per layer), scalars otherwise."""
    def leaf(key_path, w0, w):
        axis = tuple(range(1, w0.ndim)) if is_stacked(_path(key_path)) else None
        return change_norms(w0, w, axis)
    return jax.tree_util.tree_map_with_path(leaf, base, tuned)


@dataclasses.dataclass(frozen=True)
class Change:
    """The change of one tensor: `abs`, `rel`, `rms` as in the module docstring."""

    layer: int | None
    module: str
    abs: float
    rel: float  # nan when the base tensor is all zeros and the tensor moved
    rms: float
    base_norm: float  # ‖W₀‖_F
    numel: int


def _rel(d: float, base: float) -> float:
    if base > 0:
        return d / base
    return 0.0 if d == 0 else math.nan


def weight_change(base: Mapping, tuned: Mapping) -> list[Change]:
    """Per-(layer, module) change of `tuned` against `base` (two params trees of one model).

    Raises:
      ValueError: the trees hold different tensors or shapes (naming the first one).
    """
    shapes = [{_path(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
              for t in (base, tuned)]
    for shape in shapes:
        for path in shape:
            if path[-1] in _ADAPTER_LEAVES:
                raise ValueError(f"params leaf {'/'.join(path)} is a LoRA adapter; analyse "
                                 "merged weights (jaxpost.peft.lora.merge_adapters)")
    if shapes[0].keys() != shapes[1].keys():
        only = sorted(set(shapes[0]) ^ set(shapes[1]))
        raise ValueError(f"the models hold different tensors (first: {'/'.join(only[0])}); "
                         "compare checkpoints of one architecture")
    for path, shape in shapes[0].items():
        if shapes[1][path] != shape:
            raise ValueError(f"params leaf {'/'.join(path)}: shape {shapes[1][path]} differs "
                             f"from the base's {shape}")
    norms = jax.device_get(tree_change_norms(base, tuned))
    out = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(
            base, is_leaf=lambda x: not isinstance(x, Mapping))[0]:
        path = _path(key_path)
        d, b = _get(norms, path)
        if is_stacked(path):
            names = [hf_name(path, i) for i in range(np.shape(leaf)[0])]
            numel = int(np.prod(np.shape(leaf)[1:]))
        else:
            names, d, b, numel = [hf_name(path)], [d], [b], int(np.prod(np.shape(leaf)))
        for name, di, bi in zip(names, np.atleast_1d(d), np.atleast_1d(b)):
            di, bi = float(di), float(bi)
            out.append(Change(*module_of(name), di, _rel(di, bi),
                              di / math.sqrt(max(numel, 1)), bi, numel))
    return out


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def module_sort_key(module: str) -> tuple[int, str]:
    """Orders modules as `MODULE_ORDER` (biases after their weight, unknown ones last)."""
    head, _, tail = module.partition(".")
    rank = MODULE_ORDER.index(head) if head in MODULE_ORDER else len(MODULE_ORDER)
    return rank, tail or "", module


def aggregate_rel(changes: list[Change], by_module: bool = True) -> dict[str, float]:
    """Relative change of whole module types over the layer stack:
    `sqrt(Σ abs²) / sqrt(Σ ‖W₀‖²)` over the layers of each module (layer tensors only)."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for c in changes:
        if c.layer is None and by_module:
            continue
        num[c.module] = num.get(c.module, 0.0) + c.abs ** 2
        den[c.module] = den.get(c.module, 0.0) + c.base_norm ** 2
    return {m: _rel(math.sqrt(num[m]), math.sqrt(den[m]))
            for m in sorted(num, key=module_sort_key)}


__all__ = [
    "MODULE_ORDER",
    "Change",
    "Tensor",
    "aggregate_rel",
    "change_norms",
    "iter_tensors",
    "module_of",
    "module_sort_key",
    "tree_change_norms",
    "weight_change",
]
