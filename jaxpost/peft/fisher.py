"""Fisher information of a base model on an alignment set: diagonal and K-FAC, cached.

Both are *empirical* Fishers of the per-example log-likelihood `ℓ_n = Σ_t log p(y_t | ·)`
over the example's target tokens (the SFT loss mask), computed with the base model:

- `diagonal_fisher`: `F = (1/N) Σ_n (∂ℓ_n/∂θ)²` per parameter, from per-example
  gradients (`jax.vmap(jax.grad(...))` over the rows of a batch), for any subtree of the
  params (LoRA targets, or every trainable tensor in full fine-tuning);
- `kfac_factors`: per Linear kernel W [in, out] (ALGORITHMS.md §1.3 (ii)),
  `S_in = mean over tokens of x xᵀ` (the layer's inputs) and
  `S_out = (1/N) Σ_n Σ_t g gᵀ` (g = ∂ℓ_n/∂y, the output gradients), so that
  `F ≈ S_in ⊗ S_out` ("K-FAC expand": exact for one token per example), with the top
  `k_in`/`k_out` eigenpairs defining `P_A(ΔW) = U_in U_inᵀ ΔW U_out U_outᵀ` (kernel
  layout; `U_out U_outᵀ ΔW U_in U_inᵀ` in the HF [out, in] layout).

Data: any SFT-format records, one example per row (`pack=False`): a row's example is
its non-padding tokens. Rows without target tokens are skipped (not counted in N).
`save_fisher` writes the arrays with orbax and a JSON `fingerprint` (the model config,
every param shape and a per-tensor checksum of the base params, the data's identity
and a digest of its tokens); `load_fisher` refuses a Fisher whose fingerprint differs
from the caller's, naming what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models import (
    ModelConfig,
    Transformer,
    token_logprobs,
    unstack_layer_params,
)
from jaxpost.models.layers import Linear
from jaxpost.models.transformer import layer_name

__all__ = ["DIAGONAL", "KFAC", "Fisher", "FisherMismatchError", "data_digest",
           "diagonal_fisher", "fingerprint", "kfac_factors", "linear_io", "load_fisher",
           "save_fisher", "select_paths"]

DIAGONAL, KFAC = "diagonal", "kfac"
_META_FILE, _ARRAYS_DIR = "fisher.json", "arrays"
#: ModelConfig fields that do not change what the params compute (left out of the
#: fingerprint, so a Fisher made in float32 serves a bfloat16 run of the same model).
_FREE_FIELDS = ("dtype", "scan_layers", "remat_policy", "initializer_range", "lora_scale",
                "lora_dropout")


class FisherMismatchError(ValueError):
    """A cached Fisher was made for another model, other params or other data."""


@dataclasses.dataclass
class Fisher:
    """A Fisher estimate and what it was made from.

    Attributes:
      kind: `"diagonal"` or `"kfac"`.
      tree: diagonal: nested dicts mirroring the params (`{..: {"kernel": F}}`); kfac:
        `{..: {"kernel": {"s_in", "s_out", "u_in", "lam_in", "u_out", "lam_out"}}}`
        (leading layers axis on stacked kernels; `u_*` columns are eigenvectors,
        eigenvalues `lam_*` descending).
      num_examples: N, the examples with at least one target token.
      fingerprint: `fingerprint(...)` of the base model, params and data.
    """

    kind: str
    tree: Any
    num_examples: int
    fingerprint: dict


# ------------------------------------------------------------------------ per example
def _row_nll(model: Transformer, params, row: Mapping[str, jax.Array]) -> jax.Array:
    """−ℓ_n: the summed NLL of one row's target tokens (row leaves [T])."""
    one = {k: v[None] for k, v in row.items()}
    logits = model.apply({"params": params}, one["tokens"], positions=one.get("positions"),
                         segment_ids=one.get("segment_ids"))
    logp = token_logprobs(logits[:, :-1], one["tokens"][:, 1:])
    return -jnp.sum(logp * one["loss_mask"][:, 1:].astype(jnp.float32))


def _has_targets(batch) -> jax.Array:
    return (jnp.sum(batch["loss_mask"][:, 1:], axis=1) > 0).astype(jnp.float32)


def _fisher_cfg(cfg: ModelConfig) -> ModelConfig:
    # Float32 compute, no remat (the K-FAC interceptor must see the layers' own trace).
    return cfg.replace(dtype="float32", remat_policy="none", lora_dropout=0.0)


def select_paths(params: Mapping, paths: Iterable[tuple[str, ...]]) -> dict:
    """The subtree of `params` with the leaves at `paths` (tuples of keys)."""
    out: dict = {}
    for path in paths:
        node, dst = params, out
        for k in path[:-1]:
            node, dst = node[k], dst.setdefault(k, {})
        dst[path[-1]] = node[path[-1]]
    return out


def _split_selected(params: Mapping, selected: Mapping):
    """(selected leaves, the rest) of a nested dict; `selected` names the leaves."""
    wrt, rest = {}, {}
    for k, v in params.items():
        if k in selected and isinstance(selected[k], Mapping) and isinstance(v, Mapping):
            w, r = _split_selected(v, selected[k])
            if w:
                wrt[k] = w
            if r:
                rest[k] = r
        elif k in selected:
            wrt[k] = v
        else:
            rest[k] = v
    return wrt, rest


def _merge(a: Mapping, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if k in out and isinstance(v, Mapping) else v
    return out


def diagonal_fisher(model_cfg: ModelConfig, params: Mapping, batches: Iterable[Mapping],
                    select: Mapping, *, shardings: Any = None, chunk: int = 0) -> Fisher:
    """The empirical diagonal Fisher `(1/N) Σ_n (∂ℓ_n/∂θ)²` of the leaves `select` names.

    Args:
      model_cfg: the base model's config.
      params: the base params (no adapters: `jaxpost.peft.lora.strip_adapters`).
      batches: SFT batches, one example per row (`pack=False`), host or device arrays.
      select: nested dicts naming the leaves (any leaf values: shapes, bools), e.g.
        `select_paths(params, [("layers", "self_attn", "q_proj", "kernel")])`.
      shardings: NamedShardings of the selected leaves (the result is placed on them,
        sharded like the params); default: wherever jit puts it.
      chunk: rows per vmap call (0: the whole batch); bounds the memory of the
        per-example gradients (chunk × the selected params).

    Returns:
      `Fisher(kind="diagonal", tree=..., num_examples=N, fingerprint={})`; the tree has
      the selected leaves' paths and shapes, float32.
    """
    cfg = _fisher_cfg(model_cfg)
    model = Transformer(cfg)
    wrt, rest = _split_selected(params, select)
    if not jax.tree.leaves(wrt):
        raise ValueError("diagonal_fisher: `select` names no leaf of params")

    def batch_sums(wrt, rest, batch):
        keep = _has_targets(batch)

        def rows(b, k):
            grads = jax.vmap(lambda row: jax.grad(
                lambda w: _row_nll(model, _merge(rest, w), row))(wrt))(b)
            return jax.tree.map(
                lambda g: jnp.einsum("n,n...->...", k, jnp.square(g.astype(jnp.float32))),
                grads)
        n = batch["tokens"].shape[0]
        c = chunk if chunk and n % chunk == 0 else n
        if c == n:
            sums = rows(batch, keep)
        else:
            split = jax.tree.map(lambda x: x.reshape((n // c, c) + x.shape[1:]), batch)
            parts = jax.lax.map(lambda xs: rows(xs[0], xs[1]),
                                (split, keep.reshape(n // c, c)))
            sums = jax.tree.map(lambda x: jnp.sum(x, 0), parts)
        return sums, jnp.sum(keep)

    step = jax.jit(batch_sums)
    total, count = None, 0.0
    for batch in batches:
        batch = {k: jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids",
                                                     "loss_mask") if k in batch}
        sums, n = step(wrt, rest, batch)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        count += float(n)
    if total is None or count == 0:
        raise ValueError("diagonal_fisher: the alignment data gave no example with target "
                         "tokens (empty source, or every loss_mask is 0)")
    out_sh = shardings if shardings is not None else None
    tree = jax.jit(lambda t: jax.tree.map(lambda x: x / count, t), out_shardings=out_sh)(total)
    return Fisher(DIAGONAL, tree, int(count), {})


# ------------------------------------------------------------------------------ K-FAC
def _module_key(path: tuple[str, ...], num_layers: int):
    """A per_layer Linear's module path -> (stacked kernel path, layer index or None)."""
    head = path[0]
    for i in range(num_layers):
        if head == layer_name(i):
            return ("layers",) + tuple(path[1:]) + ("kernel",), i
    return tuple(path) + ("kernel",), None


def linear_io(model_cfg: ModelConfig, params: Mapping, batch: Mapping,
              kernels: Iterable[tuple[str, ...]]) -> tuple[dict, dict]:
    """Inputs x [B, T, in] and output gradients g = ∂(Σ_n ℓ_n)/∂y [B, T, out] of the
    Linear layers whose kernels are `kernels` (stacked paths), keyed `(path, layer)`.

    The model runs unrolled (`layer_params="per_layer"`); `flax.linen.intercept_methods`
    records each targeted Linear's input and adds a zero array to its output, whose
    gradient is g. Traceable (used inside `jit`).
    """
    cfg = _fisher_cfg(model_cfg)
    model = Transformer(cfg, layer_params="per_layer")
    per_layer = unstack_layer_params(params)
    wanted = {}
    for path in kernels:
        path = tuple(path)
        if path[0] == "layers":
            for i in range(cfg.num_layers):
                wanted[(layer_name(i),) + path[1:-1]] = (path, i)
        else:
            wanted[path[:-1]] = (path, None)

    def forward(eps, record_shapes=None):
        xs = {}

        def intercept(next_fun, args, kwargs, context):
            mod = context.module
            if not (isinstance(mod, Linear) and context.method_name == "__call__"):
                return next_fun(*args, **kwargs)
            key = wanted.get(tuple(mod.path))
            y = next_fun(*args, **kwargs)
            if key is None:
                return y
            xs[key] = args[0].astype(jnp.float32)
            if record_shapes is not None:
                record_shapes[key] = jax.ShapeDtypeStruct(y.shape, jnp.float32)
                return y
            return y + eps[key].astype(y.dtype)

        with nn.intercept_methods(intercept):
            logits = model.apply({"params": per_layer}, batch["tokens"],
                                 positions=batch.get("positions"),
                                 segment_ids=batch.get("segment_ids"))
        logp = token_logprobs(logits[:, :-1], batch["tokens"][:, 1:])
        loss = -jnp.sum(logp * batch["loss_mask"][:, 1:].astype(jnp.float32))
        return loss, xs

    shapes: dict = {}
    jax.eval_shape(lambda: forward({}, shapes))
    missing = sorted(set(wanted.values()) - set(shapes))
    if missing:
        raise ValueError(f"linear_io: no Linear layer runs for kernels {missing[:3]}")
    zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    grads, xs = jax.grad(forward, has_aux=True)(zeros)
    return xs, grads


def _top_eig(s: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    lam, u = jnp.linalg.eigh(s)
    k = min(k, s.shape[-1])
    return u[..., ::-1][..., :k], lam[..., ::-1][..., :k]


def kfac_factors(model_cfg: ModelConfig, params: Mapping, batches: Iterable[Mapping],
                 kernels: Iterable[tuple[str, ...]], *, top_k_in: int = 8,
                 top_k_out: int = 8) -> Fisher:
    """K-FAC factors `S_in`, `S_out` and their top eigenpairs per Linear kernel.

    Args:
      model_cfg, params, batches: as for `diagonal_fisher`.
      kernels: stacked kernel paths (`("layers", "self_attn", "q_proj", "kernel")`,
        `("lm_head", "kernel")`).
      top_k_in, top_k_out: eigenvectors kept of S_in and S_out (capped at the dims).

    Returns:
      `Fisher(kind="kfac", ...)`: `S_in = Σ_{valid tokens} x xᵀ / #tokens` and
      `S_out = Σ_{n, t} g gᵀ / N`, with `u_in [.., in, k_in]`, `lam_in [.., k_in]`,
      `u_out`, `lam_out` (descending).
    """
    kernels = [tuple(k) for k in kernels]

    def batch_sums(params, batch):
        xs, gs = linear_io(model_cfg, params, batch, kernels)
        valid = (batch["segment_ids"] != 0).astype(jnp.float32)
        s_in = {k: jnp.einsum("bt,bti,btj->ij", valid, x, x) for k, x in xs.items()}
        s_out = {k: jnp.einsum("bti,btj->ij", g, g) for k, g in gs.items()}
        return s_in, s_out, jnp.sum(valid), jnp.sum(_has_targets(batch))

    step = jax.jit(batch_sums)
    acc, tokens, count = None, 0.0, 0.0
    for batch in batches:
        batch = {k: jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids",
                                                     "loss_mask") if k in batch}
        s_in, s_out, t, n = step(params, batch)
        acc = (s_in, s_out) if acc is None else jax.tree.map(jnp.add, acc, (s_in, s_out))
        tokens, count = tokens + float(t), count + float(n)
    if acc is None or count == 0:
        raise ValueError("kfac_factors: the alignment data gave no example with target tokens")
    s_in, s_out = acc
    tree: dict = {}
    for path in kernels:
        keys = sorted((k for k in s_in if k[0] == path), key=lambda k: -1 if k[1] is None else k[1])
        stack = (lambda xs: jnp.stack(xs)) if keys[0][1] is not None else (lambda xs: xs[0])
        a = stack([s_in[k] / tokens for k in keys])
        g = stack([s_out[k] / count for k in keys])
        u_in, lam_in = _top_eig(a, top_k_in)
        u_out, lam_out = _top_eig(g, top_k_out)
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = {"s_in": a, "s_out": g, "u_in": u_in, "lam_in": lam_in,
                          "u_out": u_out, "lam_out": lam_out}
    return Fisher(KFAC, tree, int(count), {})


# ------------------------------------------------------------------------ fingerprint
def data_digest(batches: Iterable[Mapping]) -> str:
    """sha256 of the tokens and loss masks of `batches` (the data a Fisher saw)."""
    h = hashlib.sha256()
    for b in batches:
        for k in ("tokens", "loss_mask"):
            h.update(np.ascontiguousarray(np.asarray(b[k])).tobytes())
    return h.hexdigest()


def _checksums(params: Mapping) -> dict[str, list[float]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    sums = jax.jit(lambda xs: [jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                          jnp.sum(jnp.square(x.astype(jnp.float32)))])
                               for x in xs])([x for _, x in flat])
    return {jax.tree_util.keystr(p, simple=True, separator="/"): [float(v) for v in s]
            for (p, _), s in zip(flat, jax.device_get(sums))}


def fingerprint(model_cfg: ModelConfig, params: Mapping, data: Mapping[str, Any]) -> dict:
    """What a Fisher was made from: the model config (but its compute numerics), every
    param's shape, a per-tensor (sum, sum of squares) of the params, and `data` (the
    source's identity and `data_digest`), as JSON-ready values."""
    model = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in _FREE_FIELDS}
    shapes = {jax.tree_util.keystr(p, simple=True, separator="/"): list(np.shape(x))
              for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    return json.loads(json.dumps({"model": model, "param_shapes": shapes,
                                  "param_checksum": _checksums(params), "data": dict(data)}))


def _differences(stored: Mapping, now: Mapping, rtol: float = 1e-4) -> list[str]:
    out = []
    for key in ("model", "data"):
        a, b = stored.get(key, {}), now.get(key, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append(f"{key}.{k}: stored {a.get(k)!r}, now {b.get(k)!r}")
    a, b = stored.get("param_shapes", {}), now.get("param_shapes", {})
    shape_diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if shape_diff:
        out.append(f"param shapes differ for {shape_diff[:3]} "
                   f"(stored {[a.get(k) for k in shape_diff[:3]]}, now "
                   f"{[b.get(k) for k in shape_diff[:3]]})")
    else:
        a, b = stored.get("param_checksum", {}), now.get("param_checksum", {})
        diff = sorted(k for k in b if not np.allclose(a.get(k, [np.nan] * 2), b[k],
                                                      rtol=rtol, atol=1e-6))
        if diff:
            out.append(f"param values differ (checksums of {len(diff)} tensors, e.g. "
                       f"{diff[:3]})")
    return out


# ------------------------------------------------------------------------ save / load
def save_fisher(fisher: Fisher, path: str | os.PathLike) -> None:
    """Writes `path/arrays` (orbax) and `path/fisher.json` (kind, N, fingerprint)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, _ARRAYS_DIR), fisher.tree, force=True)
    if jax.process_index() == 0:
        tmp = os.path.join(path, _META_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"kind": fisher.kind, "num_examples": fisher.num_examples,
                       "fingerprint": fisher.fingerprint}, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(path, _META_FILE))


def load_fisher(path: str | os.PathLike, expected: Mapping | None = None, *,
                kind: str | None = None, shardings: Any = None) -> Fisher:
    """Reads a Fisher `save_fisher` wrote, refusing one made from other things.

    Args:
      path: the folder.
      expected: `fingerprint(...)` of the model, params and data about to use it; None
        skips the check.
      kind: if set, the kind it must be.
      shardings: a function `(path tuple, shape) -> Sharding` or None (default placement).

    Raises:
      FileNotFoundError: no Fisher at `path`.
      FisherMismatchError: another kind, model, params or data (each difference named).
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    meta_file = os.path.join(path, _META_FILE)
    if not os.path.exists(meta_file):
        raise FileNotFoundError(f"no Fisher at {path} (missing {_META_FILE})")
    with open(meta_file) as f:
        meta = json.load(f)
    if kind is not None and meta["kind"] != kind:
        raise FisherMismatchError(f"the Fisher at {path} is {meta['kind']!r}, the config asks "
                                  f"for {kind!r}; delete it or point the Fisher path elsewhere")
    if expected is not None:
        diff = _differences(meta["fingerprint"], expected)
        if diff:
            raise FisherMismatchError(
                f"the Fisher at {path} was made for another model or data: "
                f"{'; '.join(diff)}. Delete it (it is re-estimated) or set another path")
    with ocp.StandardCheckpointer() as ckptr:
        arrays = os.path.join(path, _ARRAYS_DIR)
        meta_tree = ckptr.metadata(arrays)
        tree_meta = getattr(meta_tree, "item_metadata", meta_tree)
        tree_meta = getattr(tree_meta, "tree", tree_meta)

        def target(p, m):
            keys = tuple(str(getattr(k, "key", k)) for k in p)
            sh = shardings(keys, tuple(m.shape)) if shardings is not None else \
                jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sh)
        abstract = jax.tree_util.tree_map_with_path(target, tree_meta)
        tree = ckptr.restore(arrays, abstract)
    return Fisher(meta["kind"], tree, int(meta["num_examples"]), meta["fingerprint"])
