"""LoRA adapters as params leaves: targets, initialisation, sharding, merging, PEFT export.

LoRA (Hu et al. 2021) adds a low-rank update to a frozen weight: `y = x·W + s·(x·A)·B`
with A [in, r], B [r, out] and the scale `s = alpha/r` (rsLoRA, Kalajdzievski 2023:
`alpha/sqrt(r)`). Here an adapter is two extra leaves next to a Linear kernel, in the same
params tree:

    layers/self_attn/q_proj/{kernel [L, in, out], lora_a [L, in, r], lora_b [L, r, out]}
    lm_head/{kernel [in, out], lora_a [in, r], lora_b [r, out]}

`jaxpost.models.layers.Linear` applies them when present (with `ModelConfig.lora_scale`
and `lora_dropout`, see `with_lora`), so training, sampling and scoring run the same
module and no merged copy of W is ever made. Everything else is a tree operation:

- `lora_targets` reads `LoraConfig.targets` (regular expressions searched in Hugging Face
  tensor names, as freeze rules are) into the targeted kernel paths, with a bool per layer
  for stacked kernels (a target may pick some layers only);
- `init_adapters` draws A as PEFT does and sets B = 0, so a fresh adapter leaves the
  model's output unchanged; `adapter_logical_axes` shards A and B like their kernel;
- `merge_adapters` folds them into the kernels (the merged Hugging Face export),
  `strip_adapters` drops them (the base model);
- `save_peft_adapter` writes a PEFT adapter folder that `peft.PeftModel.from_pretrained`
  loads onto the base model.

In a stacked leaf, layers a target does not pick hold zeros in both A and B. That is a
fixed point of gradient descent (dA ∝ B, dB ∝ A), and such rows are left out of the PEFT
export; a trainer should still freeze them with `adapter_mask`, so weight decay or a
regulariser cannot move them either.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxpost.models.config import ModelConfig
from jaxpost.models.hf import hf_name, is_stacked, leaf_hf_names, write_safetensors

__all__ = [
    "ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE", "LORA_A", "LORA_B", "LoraConfig",
    "LoraError", "adapter_logical_axes", "adapter_mask", "adapter_suffixes", "attach_adapters",
    "has_adapters", "init_adapters", "is_adapter_leaf", "lora_targets", "merge_adapters",
    "rename_adapters", "save_peft_adapter", "strip_adapters", "with_lora",
]

LORA_A, LORA_B = "lora_a", "lora_b"  # params leaf names, next to a Linear's `kernel`
_ADAPTER_LEAVES = (LORA_A, LORA_B)
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's CONFIG_NAME
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's SAFETENSORS_WEIGHTS_NAME
_PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the HF model
_RM_BACKBONE, _RM_HEAD = "model", "score"  # reward-model trees (jaxpost.rl.reward_model)
#: Leaves that are not Linear kernels and cannot carry an adapter (biases are ignored:
#: `q_proj` also finds `...q_proj.bias`, which belongs to the targeted Linear).
_NOT_ADAPTABLE = ("embedding", "scale")

Path = tuple[str, ...]
Targets = dict[Path, "np.ndarray | None"]


class LoraError(ValueError):
    """A LoRA config, target or adapter tree is malformed or does not fit the params."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The recipe section `lora`: which Linear weights get adapters, and their numerics.

    Defaults follow PEFT's `LoraConfig` where one exists (`r=8` is PEFT's; here rank 0
    means LoRA is off, so a recipe without a `lora` section trains the full model).
    """

    rank: int = 0  # r, the adapter rank; 0: LoRA off (PEFT's r defaults to 8)
    alpha: float = 8.0  # lora_alpha, numerator of the scale s = alpha/r (PEFT default 8)
    # Python regexes `re.search`ed in HF tensor names (`model.layers.3.self_attn.q_proj.
    # weight`, `lm_head.weight`); only Linear weights can match. Default: PEFT's targets
    # for Llama/Qwen2/Qwen3 (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0  # lora_dropout on the adapter's input while training (PEFT default 0)
    rslora: bool = False  # use_rslora: s = alpha/sqrt(r) (Kalajdzievski 2023; PEFT default False)

    def __post_init__(self):
        if isinstance(self.targets, str):
            raise LoraError(f"lora.targets={self.targets!r} is a string; expected a tuple of "
                            f"regular expressions, e.g. ({self.targets!r},)")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        integer = isinstance(self.rank, (int, np.integer)) and not isinstance(self.rank, bool)
        if not integer or self.rank < 0:
            raise LoraError(f"lora.rank={self.rank!r}: expected an integer >= 0 (0: LoRA off)")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"lora.dropout={self.dropout!r}: expected a rate in [0, 1)")
        for i, pattern in enumerate(self.targets):
            if not isinstance(pattern, str):
                raise LoraError(f"lora.targets[{i}]={pattern!r} is not a string (a regular "
                                "expression over Hugging Face tensor names)")
            try:
                re.compile(pattern)
            except re.error as e:
                raise LoraError(
                    f"lora.targets[{i}]={pattern!r} is not a valid regular expression: {e}"
                ) from None
        if self.rank > 0:
            if not self.targets:
                raise LoraError(f"lora.rank={self.rank} but lora.targets is empty; name the "
                                "Linear weights to adapt, e.g. ('q_proj', 'v_proj')")
            if not (math.isfinite(self.alpha) and self.alpha != 0):
                raise LoraError(f"lora.alpha={self.alpha!r}: expected a finite non-zero number "
                                "(the scale is alpha/rank; PEFT's default is 8)")

    @property
    def enabled(self) -> bool:
        """Whether LoRA is on (rank > 0)."""
        return self.rank > 0

    @property
    def scale(self) -> float:
        """`s` in `x·W + s·(x·A)·B`: alpha/rank, or alpha/sqrt(rank) with rslora; 0 when off."""
        if self.rank == 0:
            return 0.0
        return float(self.alpha) / (math.sqrt(self.rank) if self.rslora else self.rank)


def with_lora(model_cfg: ModelConfig, cfg: LoraConfig) -> ModelConfig:
    """`model_cfg` with the LoRA numerics the forward pass needs (scale and dropout)."""
    return model_cfg.replace(lora_scale=cfg.scale, lora_dropout=cfg.dropout if cfg.enabled else 0.0)


# ----------------------------------------------------------------------------- helpers
def _get(tree: Mapping, path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: Path, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _module_name(kernel_path: Path, layer: int | None) -> str:
    """The HF module name of a kernel (`model.layers.0.self_attn.q_proj`, `lm_head`)."""
    return hf_name(kernel_path, layer).removesuffix(".weight")


def is_adapter_leaf(name: str) -> bool:
    """Whether a params leaf name is an adapter factor: `lora_a`/`lora_b`, or a further
    adapter pair of the same kernel, `lora_a_<name>`/`lora_b_<name>` (`rename_adapters`)."""
    return name in _ADAPTER_LEAVES or name.startswith((LORA_A + "_", LORA_B + "_"))


def has_adapters(params: Any) -> bool:
    """Whether a params tree holds any adapter leaf (`is_adapter_leaf`)."""
    if isinstance(params, Mapping):
        return any(is_adapter_leaf(k) or has_adapters(v) for k, v in params.items())
    return False


def adapter_suffixes(params: Any) -> tuple[str, ...]:
    """The adapter pairs a params tree holds, by suffix: `""` for `lora_a`/`lora_b`,
    `"_align"` for `lora_a_align`/`lora_b_align` (sorted, `""` first)."""
    found: set[str] = set()

    def go(node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                if k.startswith(LORA_A) and is_adapter_leaf(k):
                    found.add(k[len(LORA_A):])
                go(v)
    go(params)
    return tuple(sorted(found))


def rename_adapters(adapters: Any, suffix: str) -> Any:
    """An adapter tree (`init_adapters`, `adapter_mask`, `adapter_logical_axes`) with
    `lora_a`/`lora_b` renamed `lora_a{suffix}`/`lora_b{suffix}`: a second adapter pair
    for the same kernels, which `Linear` applies next to the first (ΔW is their sum)."""
    if suffix and not (suffix.startswith("_") and len(suffix) > 1):
        raise LoraError(f"adapter suffix {suffix!r}: expected '' or '_<name>'")
    if not isinstance(adapters, Mapping):
        return adapters
    return {(k + suffix if k in _ADAPTER_LEAVES else k): rename_adapters(v, suffix)
            for k, v in adapters.items()}


# ----------------------------------------------------------------------------- targets
def lora_targets(params: Any, cfg: LoraConfig) -> Targets:
    """The Linear kernels `cfg.targets` picks, with the picked layers of stacked ones.

    Args:
      params: a params tree or its shapes (`param_shapes(cfg)`, `jax.ShapeDtypeStruct`
        leaves), of a `Transformer` or a reward model (`{"model": ..., "score": ...}`);
        adapter leaves already in it are ignored.
      cfg: the LoRA config; rank 0 gives no targets.

    Returns:
      kernel path -> bool `np.ndarray` [L] of the targeted layers for a stacked kernel
      (at least one True), None for an unstacked one (`lm_head`); in pytree order.

    Raises:
      LoraError: a target matches no Linear weight (the message names the regex and
        real names), or matches an embedding, a norm or the reward head, which are not
        Linear layers of the transformer.
    """
    if not cfg.enabled:
        return {}
    names = {p: n for p, n in leaf_hf_names(params).items() if not is_adapter_leaf(p[-1])}
    kernels = {p: n for p, n in names.items() if p[-1] == "kernel" and p[:1] != (_RM_HEAD,)}
    fixed = {p: n for p, n in names.items()
             if p[-1] in _NOT_ADAPTABLE or (p[:1] == (_RM_HEAD,) and p[-1] == "kernel")}
    examples = [n[0] for n in kernels.values()][:8]
    patterns = [re.compile(t) for t in cfg.targets]
    for i, rx in enumerate(patterns):
        bad = [n for ns in fixed.values() for n in ns if rx.search(n)]
        if bad:
            raise LoraError(
                f"lora.targets[{i}]={rx.pattern!r} matches {bad[:3]}, which cannot carry a LoRA "
                f"adapter (embeddings, norms and the reward head are not Linear layers of the "
                f"transformer); targets must match Linear weights only, e.g. {examples[:4]}")
        if not any(rx.search(n) for ns in kernels.values() for n in ns):
            raise LoraError(
                f"lora.targets[{i}]={rx.pattern!r} matches no Linear weight; the regex is "
                f"searched in Hugging Face names such as {examples}")
    out: Targets = {}
    for path, ns in kernels.items():
        hit = np.array([any(rx.search(n) for rx in patterns) for n in ns], dtype=bool)
        if hit.any():
            out[path] = hit if is_stacked(path) else None
    return out


def adapter_mask(targets: Targets) -> dict:
    """A freeze mask (`jaxpost.peft.freeze` convention) of the adapter tree.

    `True` for an unstacked adapter, the layer mask for a stacked one (untargeted rows of
    a stacked adapter must not train), shaped like `init_adapters`'s result.
    """
    out: dict = {}
    for path, layers in targets.items():
        for leaf in _ADAPTER_LEAVES:
            _set(out, path[:-1] + (leaf,), True if layers is None else layers.copy())
    return out


# ------------------------------------------------------------------------------- init
def init_adapters(base_shapes: Any, cfg: LoraConfig, rng: jax.Array) -> dict:
    """Fresh adapters for the kernels `cfg.targets` picks: A as PEFT draws it, B = 0.

    A follows PEFT 0.21's default (`init_lora_weights=True`: `kaiming_uniform_(a=sqrt(5))`
    on its [r, in] weight, i.e. U(-1/sqrt(in), 1/sqrt(in))) and B is zero, so the model's
    output is unchanged until B trains. Untargeted layers of a stacked kernel get zeros
    in both. Traceable: `jax.jit(lambda k: init_adapters(shapes, cfg, k),
    out_shardings=...)` creates them in place on a mesh.

    Args:
      base_shapes: the params (or their shapes) the adapters are for.
      cfg: the LoRA config (rank 0: an empty tree).
      rng: a PRNG key.

    Returns:
      Nested dicts mirroring the params paths with only `lora_a` [(L,) in, r] and
      `lora_b` [(L,) r, out] leaves, in each kernel's dtype.
    """
    targets = lora_targets(base_shapes, cfg)
    out: dict = {}
    keys = jax.random.split(rng, max(len(targets), 1))
    for key, (path, layers) in zip(keys, targets.items()):
        leaf = _get(base_shapes, path)
        *lead, d_in, d_out = leaf.shape
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key, (*lead, d_in, cfg.rank), jnp.float32, -bound, bound)
        if layers is not None:
            a = a * jnp.asarray(layers, jnp.float32)[:, None, None]
        _set(out, path[:-1] + (LORA_A,), a.astype(leaf.dtype))
        _set(out, path[:-1] + (LORA_B,), jnp.zeros((*lead, cfg.rank, d_out), leaf.dtype))
    return out


def adapter_logical_axes(base_logical_axes: Any, targets: Targets) -> dict:
    """Logical axis names of the adapters, so each shards like its base kernel.

    A kernel's axes `(layers?, in, out)` give `lora_a` `(layers?, in, None)` and `lora_b`
    `(layers?, None, out)`: A splits its input dimension and B its output dimension as W
    does, and the rank dimension is replicated. Use with `jaxpost.sharding`:
    `logical_to_shardings(adapter_logical_axes(param_logical_axes(cfg), targets),
    jax.eval_shape(lambda: init_adapters(shapes, lora_cfg, key)), mesh)`.

    Args:
      base_logical_axes: the params' logical axes (`jaxpost.models.param_logical_axes`;
        `PartitionSpec` or tuple leaves).
      targets: `lora_targets(...)`.
    """
    out: dict = {}
    for path in targets:
        spec = _get(base_logical_axes, path)
        *lead, ax_in, ax_out = tuple(spec)
        wrap = (lambda axes: PartitionSpec(*axes)) if isinstance(spec, PartitionSpec) else tuple
        _set(out, path[:-1] + (LORA_A,), wrap((*lead, ax_in, None)))
        _set(out, path[:-1] + (LORA_B,), wrap((*lead, None, ax_out)))
    return out


# ------------------------------------------------------------------- tree operations
def attach_adapters(params: Mapping, adapters: Mapping) -> dict:
    """`params` with the adapter leaves of `adapters` added next to their kernels.

    Raises:
      LoraError: an adapter has no kernel next to it, or the params already hold it.
    """
    def go(p, a, where):
        out = dict(p)
        for k, v in a.items():
            here = where + (k,)
            if is_adapter_leaf(k):
                if "kernel" not in p:
                    raise LoraError(f"adapter {'/'.join(here)} has no kernel next to it in params")
                if k in p:
                    raise LoraError(f"params already hold {'/'.join(here)}")
                out[k] = v
            elif isinstance(v, Mapping):
                if k not in p or not isinstance(p[k], Mapping):
                    raise LoraError(f"adapter path {'/'.join(here)} is not a module of params")
                out[k] = go(p[k], v, here)
            else:
                raise LoraError(f"adapters leaf {'/'.join(here)} is not lora_a/lora_b")
        return out
    return go(params, adapters, ())


def strip_adapters(params: Mapping) -> dict:
    """`params` without its `lora_a`/`lora_b` leaves: the base model, adapters off."""
    return {k: strip_adapters(v) if isinstance(v, Mapping) else v
            for k, v in params.items() if not is_adapter_leaf(k)}


def merge_adapters(params: Mapping, scale: float) -> dict:
    """Folds every adapter into its kernel: `W + scale·A·B`, adapter leaves removed; a
    kernel with several adapter pairs (`rename_adapters`) gets the sum of their updates.

    Works on stacked leaves (`[L, in, r] @ [L, r, out]`) and on reward-model trees. The
    product is accumulated in float32 at full precision and cast back to the kernel's
    dtype. The result has the structure `to_hf` expects (the merged export).

    Args:
      params: params with adapters (`attach_adapters`).
      scale: the adapter scale, `LoraConfig.scale` (`ModelConfig.lora_scale`).
    """
    def go(node, where):
        if not isinstance(node, Mapping):
            return node
        out = {k: go(v, where + (k,)) for k, v in node.items() if not is_adapter_leaf(k)}
        present = sorted(k for k in node if is_adapter_leaf(k))
        if present:
            pairs = _pairs(node, where)
            w = node["kernel"]
            delta = sum(jnp.einsum("...ir,...ro->...io", jnp.asarray(a, jnp.float32),
                                   jnp.asarray(b, jnp.float32),
                                   precision=jax.lax.Precision.HIGHEST) for a, b in pairs)
            out["kernel"] = (jnp.asarray(w, jnp.float32) + scale * delta).astype(w.dtype)
        return out
    return go(params, ())


def _pairs(node: Mapping, where: Path) -> list[tuple[Any, Any]]:
    """`[(A, B), ...]` of a module's adapter pairs (`lora_a`/`lora_b` first).

    Raises:
      LoraError: a factor without its partner, or adapters without a kernel.
    """
    present = sorted(k for k in node if is_adapter_leaf(k))
    sfx = sorted({k[len(LORA_A):] if k.startswith(LORA_A) else k[len(LORA_B):] for k in present})
    lonely = [k for s in sfx for k in (LORA_A + s, LORA_B + s) if k not in node]
    if lonely or "kernel" not in node:
        raise LoraError(f"params/{'/'.join(where)} holds {present} and "
                        f"{'a kernel' if 'kernel' in node else 'no kernel'}; an "
                        f"adapter needs lora_a, lora_b and the kernel they adapt"
                        + (f" (missing {lonely})" if lonely else ""))
    return [(node[LORA_A + s], node[LORA_B + s]) for s in sfx]


# -------------------------------------------------------------------------- PEFT export
def _host(x: Any) -> np.ndarray:
    """The full value of a (possibly sharded, multi-host) array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _peft_target_modules(kernels: Mapping[Path, list[str]], targets: Targets) -> list[str] | str:
    """PEFT's `target_modules` selecting exactly the targeted modules.

    A list of module names (PEFT matches a list entry as a suffix after a dot) when each
    named module is targeted in every layer; otherwise one regular expression, which PEFT
    `re.fullmatch`es against full module names (`model.layers.0.self_attn.q_proj`).
    """
    by_short: dict[str, set[str]] = {}  # short name -> module names in the model
    for path, names in kernels.items():
        by_short.setdefault(path[-2], set()).update(n.removesuffix(".weight") for n in names)
    chosen = {_module_name(p, i) for p, layers in targets.items()
              for i in ([None] if layers is None else np.flatnonzero(layers).tolist())}
    shorts = sorted({p[-2] for p in targets})
    if all(by_short[s] <= chosen for s in shorts):
        return shorts
    groups: dict[tuple[int, ...], list[str]] = {}  # layer ids -> module suffixes
    unstacked = []
    for path, layers in targets.items():
        if layers is None:
            unstacked.append(re.escape(_module_name(path, None)))
        else:  # ("layers", "self_attn", "q_proj", "kernel") -> self_attn.q_proj
            groups.setdefault(tuple(np.flatnonzero(layers).tolist()), []).append(
                re.escape(".".join(path[1:-1])))
    alternatives = [rf"model\.layers\.(?:{'|'.join(map(str, ids))})\.(?:{'|'.join(sfx)})"
                    for ids, sfx in groups.items()] + unstacked
    return "|".join(alternatives)


def save_peft_adapter(model_cfg: ModelConfig, cfg: LoraConfig, params: Mapping,
                      out_dir: str | os.PathLike, base_model_name_or_path: str) -> None:
    """Writes a PEFT LoRA adapter folder that `peft.PeftModel.from_pretrained` loads.

    `adapter_config.json` (`peft_type: "LORA"`, `task_type: "CAUSAL_LM"`, `r`, `lora_alpha`,
    `lora_dropout`, `use_rslora`, `target_modules`, `bias: "none"`, ...) and
    `adapter_model.safetensors` with PEFT's key names and layouts:
    `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] (= A.T)
    and `...lora_B.weight` [out, r] (= B.T); `base_model.model.lm_head.lora_A.weight`.
    Only targeted layers are written; a kernel with several adapter pairs (AlignGuard's
    alignment and task adapters) is written as one adapter of rank `rank·pairs` (the
    factors concatenated, `lora_alpha` rescaled to keep s), so PEFT applies their sum.
    `target_modules` is a list of module names when
    each is targeted in every layer, else a regex PEFT full-matches against module names.
    Every process must call this (sharded arrays are gathered); process 0 writes.

    Args:
      model_cfg: the model's config (its family and layer count).
      cfg: the LoRA config the adapters were trained with.
      params: the model's params with adapters (a `Transformer` tree, not a reward model).
      out_dir: the folder to write (created if needed).
      base_model_name_or_path: the base Hugging Face folder or hub id, stored as is in
        `adapter_config.json` (PEFT's `AutoPeftModelForCausalLM` loads the base from it).

    Raises:
      LoraError: the params carry no adapters, adapters that `cfg.targets` do not pick,
        or adapters of the wrong shape; or the tree is a reward model (PEFT has no
        Bradley-Terry head: export it merged).
    """
    if not cfg.enabled:
        raise LoraError("save_peft_adapter: lora.rank is 0 (LoRA off); there is no adapter")
    if _RM_HEAD in params or _RM_BACKBONE in params:
        raise LoraError("save_peft_adapter: these are reward-model params ({'model', 'score'}); "
                        "PEFT's CAUSAL_LM adapter has no score head: export the merged model "
                        "(merge_adapters) instead")
    targets = lora_targets(params, cfg)
    suffixes = adapter_suffixes(params) or ("",)
    for path, layers in targets.items():
        module = path[:-1]
        node = _get(params, module)
        *lead, d_in, d_out = np.shape(node["kernel"])
        want = {leaf + s: shape for s in suffixes for leaf, shape in (
            (LORA_A, (*lead, d_in, cfg.rank)), (LORA_B, (*lead, cfg.rank, d_out)))}
        for leaf, shape in want.items():
            if leaf not in node:
                raise LoraError(f"save_peft_adapter: lora.targets pick {'/'.join(module)}, "
                                f"whose params hold no {leaf}; were the adapters attached?")
            if tuple(np.shape(node[leaf])) != shape:
                raise LoraError(
                    f"save_peft_adapter: params/{'/'.join(module)}/{leaf} has shape "
                    f"{tuple(np.shape(node[leaf]))}; lora.rank={cfg.rank} implies {shape}")
    names = leaf_hf_names(params)
    extra = sorted("/".join(p) for p in names
                   if is_adapter_leaf(p[-1]) and p[:-1] + ("kernel",) not in targets)
    if extra:
        raise LoraError(f"save_peft_adapter: params hold adapters {extra} that lora.targets="
                        f"{cfg.targets} do not pick; pass the LoraConfig they were made with")
    wrong = sorted("/".join(p) for p, n in names.items()
                   if is_stacked(p) and len(n) != model_cfg.num_layers)
    if wrong:
        raise LoraError(f"save_peft_adapter: params {wrong[:3]} are not stacked on "
                        f"model_cfg.num_layers={model_cfg.num_layers} layers")

    tensors: list[tuple[tuple[int, int, str], str, np.ndarray]] = []
    for path, layers in targets.items():
        module = path[:-1]
        # Several adapter pairs (`rename_adapters`) export as one adapter of rank
        # rank·pairs: [A1 | A2] · [B1; B2] = A1·B1 + A2·B2 (alpha rescaled below).
        a = np.concatenate([_host(_get(params, module + (LORA_A + s,))) for s in suffixes], -1)
        b = np.concatenate([_host(_get(params, module + (LORA_B + s,))) for s in suffixes], -2)
        for i in [None] if layers is None else np.flatnonzero(layers).tolist():
            for leaf, x in ((LORA_A, a), (LORA_B, b)):
                value = np.ascontiguousarray((x if i is None else x[i]).T)
                name = _PEFT_PREFIX + hf_name(module + (leaf,), i)
                tensors.append(((1 if i is None else 0, i or 0, name), name, value))
    tensors.sort(key=lambda t: t[0])  # layers by index, then lm_head (HF order)

    kernels = {p: n for p, n in names.items() if p[-1] == "kernel"}
    rank = cfg.rank * len(suffixes)
    alpha = cfg.alpha if len(suffixes) == 1 else cfg.scale * (
        math.sqrt(rank) if cfg.rslora else rank)  # the same scale s at the larger rank
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.fspath(base_model_name_or_path),
        "r": int(rank),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": _peft_target_modules(kernels, targets),
        "bias": "none",
        "fan_in_fan_out": False,  # PEFT's lora_B/lora_A are torch Linear weights [out, in]
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
    }
    if jax.process_index() == 0:
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        write_safetensors(os.path.join(out_dir, ADAPTER_WEIGHTS_FILE),
                          {name: value for _, name, value in tensors})
        with open(os.path.join(out_dir, ADAPTER_CONFIG_FILE), "w") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
            f.write("\n")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"jaxpost.save_peft_adapter:{out_dir}")
