"""Device mesh, logical-axis rules, and placement of params and batches.

Model code names logical axes only ("embed", "heads", "activation_batch", ...); the rules
here map them to the mesh axes `data`, `fsdp` and `tensor`, so switching between data
parallelism, FSDP and tensor parallelism is a config change. The same code runs on one CPU
device, a fake 8-device CPU mesh, a GPU, and a multi-host TPU pod.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

#: Logical axis -> mesh axes. Parameters: FSDP shards the model dimension, tensor
#: parallelism the heads / MLP / vocabulary. Activations: batch over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("head_dim", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; exactly one may be -1, meaning "all remaining devices"."""

    data: int = 1  # pure data parallelism (parameters replicated)
    fsdp: int = -1  # data parallelism with parameters and optimizer state sharded
    tensor: int = 1  # tensor (model) parallelism over heads / MLP / vocab

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"MeshConfig {self}: at most one axis may be -1")
        for name, s in zip(MESH_AXES, sizes):
            if s == 0 or s < -1:
                raise ValueError(f"MeshConfig.{name}={s}: must be a positive size or -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"MeshConfig {self}: {num_devices} devices are not divisible by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"MeshConfig {self} needs {math.prod(sizes)} devices, but {num_devices} are used")
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes over `devices` (default: all devices).

    Auto axes matter: `jax.make_mesh` defaults to Explicit axes in jax 0.10, under which
    ordinary sharded matmuls raise sharding-type errors.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _mesh_axes_for(name: str | None, rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules")


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> P:
    """PartitionSpec for one array; a dimension its mesh axes don't divide is replicated."""
    spec, used = [], set()
    for name, size in zip(names, shape):
        axes = tuple(a for a in _mesh_axes_for(name, rules) if a not in used and mesh.shape[a] > 1)
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]  # drop inner axes until the dimension divides evenly
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _is_axes_leaf(x) -> bool:
    return isinstance(x, (P, tuple)) and all(isinstance(n, (str, type(None))) for n in x)


def logical_to_shardings(logical_axes, shapes, mesh: Mesh, rules=DEFAULT_RULES):
    """A pytree of `NamedSharding` from pytrees of logical names and of shapes/arrays."""
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(tuple(names), x.shape, mesh, rules)),
        logical_axes, shapes, is_leaf=_is_axes_leaf)


def param_shardings(cfg, mesh: Mesh, rules=DEFAULT_RULES):
    """The `NamedSharding` of every parameter of `Transformer(cfg)`."""
    from jaxpost.models.transformer import param_logical_axes, param_shapes  # no cycle at import

    return logical_to_shardings(param_logical_axes(cfg), param_shapes(cfg), mesh, rules)


def shard_params(params, shardings):
    """Places a (host or device) parameter pytree onto `shardings`."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a global batch array of `shape`: leading dim by the `batch` rule."""
    names = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def shard_batch(batch, mesh: Mesh, rules=DEFAULT_RULES):
    """Builds global arrays from this process's slice of the batch (multi-host safe).

    Each process passes the rows it loaded; on one host these are all rows.
    """
    def put(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        sharding = batch_sharding(mesh, global_shape, rules)
        return jax.make_array_from_process_local_data(sharding, x, global_shape)
    return jax.tree.map(put, batch)


def local_rows(x) -> np.ndarray:
    """This process's block of a global array (the inverse of `shard_batch`), on host.

    The block is the box of the global array this process's devices hold: for a batch
    made by `shard_batch` it is exactly the rows this process passed in. One process:
    the whole array. Works on pytrees.
    """
    def get(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable:
            return np.asarray(a)
        shards = a.addressable_shards
        starts = [min(s.index[d].indices(a.shape[d])[0] for s in shards) for d in range(a.ndim)]
        stops = [max(s.index[d].indices(a.shape[d])[1] for s in shards) for d in range(a.ndim)]
        out = np.empty([b - s for s, b in zip(starts, stops)], a.dtype)
        for s in shards:
            box = tuple(slice(i.indices(n)[0] - o, i.indices(n)[1] - o)
                        for i, n, o in zip(s.index, a.shape, starts))
            out[box] = np.asarray(s.data)
        return out
    return jax.tree.map(get, x)


def global_value(x) -> np.ndarray:
    """The whole value of a (possibly multi-host) array on every host; a collective when
    the array spans other processes' devices (all must call it). Works on pytrees."""
    def get(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated:
            return np.asarray(a)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return jax.tree.map(get, x)


def gather_processes(x) -> np.ndarray:
    """Host arrays of every process concatenated along axis 0 in process order (the
    same on all; a collective). One process: `x` itself. Works on pytrees."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, x)
    from jax.experimental import multihost_utils
    return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(
        np.asarray(a), tiled=True)), x)


@contextlib.contextmanager
def logical_rules(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
    """Activates the mesh and the rules for activation sharding constraints.

    Use it inside the function being jitted, around the model call: it only affects
    tracing, so it is safe under `jit` and leaves no global state behind.
    """
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield
