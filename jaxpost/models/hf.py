"""Hugging Face checkpoints <-> jaxpost parameters, in both directions.

`from_hf` reads a local Hugging Face folder (`config.json` plus one `model.safetensors` or
sharded `model-0000i-of-0000n.safetensors` files with `model.safetensors.index.json`) into
the plain parameter pytree of `Transformer(cfg)`; `to_hf` writes one back that
`transformers.AutoModelForCausalLM.from_pretrained` loads.

Both directions move one tensor at a time: reading memory-maps the safetensors files and
places each tensor (each layer of a stacked parameter) straight onto its target sharding,
so the host never holds more than one tensor; writing gathers one tensor at a time and
streams it into the file. The safetensors format is read and written here directly
(8-byte little-endian header length, JSON header, raw little-endian data), which handles
bfloat16 through `ml_dtypes` on every numpy version.

Name mapping (HF <- jaxpost), with `i` the index on the stacked `layers` axis:

    model.embed_tokens.weight            <- embed_tokens/embedding          [V, D]
    model.layers.{i}.<module>.weight     <- layers/<module>/kernel[i].T     (Linear)
    model.layers.{i}.<module>.weight     <- layers/<module>/scale[i]        (RMSNorm)
    model.layers.{i}.<module>.bias       <- layers/<module>/bias[i]
    model.norm.weight                    <- norm/scale
    lm_head.weight                       <- lm_head/kernel.T  (absent when tied)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, Sharding, SingleDeviceSharding

from jaxpost.models.config import ModelConfig, UnsupportedModelError
from jaxpost.models.transformer import param_shapes
from jaxpost.sharding import DEFAULT_RULES, param_shardings

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: safetensors dtype tag <-> numpy dtype.
_ST_TO_NP = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}

#: Buffers some older checkpoints carry; they hold no learned weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class HFCheckpointError(ValueError):
    """A Hugging Face folder does not match the model its config.json describes.

    Attributes:
      tensor: the HF name of the offending tensor, or None when the error is about the
        folder as a whole (no weight files, an unreadable header).
    """

    def __init__(self, message: str, tensor: str | None = None):
        super().__init__(message)
        self.tensor = tensor


# ------------------------------------------------------------------------ name mapping
#: Params leaf -> HF name suffix; LoRA adapters use PEFT's names (`lora_A` is [r, in]).
_HF_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias",
            "lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}
#: Top-level params keys of a reward model (see `jaxpost.rl.reward_model`) and of its
#: GazeReward part (`jaxpost.rl.gaze_reward`).
_RM_BACKBONE, _RM_HEAD, _RM_GAZE = "model", "score", "gaze"
_CRITIC = "critic"  # a PPO run's separate value model: {"model", "score"} under "critic"


def is_stacked(path: Sequence[str]) -> bool:
    """Whether the params leaf at `path` is stacked on a leading `layers` axis."""
    path = tuple(path)
    if path[:1] == (_CRITIC,):
        path = path[1:]
    if path[:1] == (_RM_BACKBONE,):
        path = path[1:]
    return path[:1] == ("layers",)


def hf_name(path: Sequence[str], layer: int | None = None) -> str:
    """The Hugging Face name of the params leaf at `path` (of layer `layer` if stacked).

    The one mapping used by conversion, freeze rules, LoRA targets and PEFT export:
    `("layers", "mlp", "down_proj", "kernel"), 12 -> "model.layers.12.mlp.down_proj.weight"`,
    `("lm_head", "kernel") -> "lm_head.weight"`; a reward model's backbone
    (`("model", ...)`) maps like a plain model and its head to `score.weight`/`score.bias`
    (HF's sequence-classification names), its gaze part to `gaze.projector.fc1.weight`,
    `gaze.separators`, ...; LoRA leaves `lora_a`/`lora_b` map to PEFT's
    `...q_proj.lora_A.weight` / `lora_B.weight`. A PPO run's separate critic
    (`("critic", "model" | "score", ...)`) gets the same names behind `critic.`
    (`critic.model.layers.3.mlp.up_proj.weight`, `critic.score.weight`).
    """
    path = tuple(str(k) for k in path)
    if path[:1] == (_CRITIC,):
        return f"{_CRITIC}.{hf_name(path[1:], layer)}"
    if path[:1] == (_RM_HEAD,):
        return f"score.{_HF_LEAF.get(path[-1], path[-1])}"
    if path[:1] == (_RM_GAZE,):
        *modules, leaf = path
        return ".".join(modules + ([_HF_LEAF[leaf]] if leaf in _HF_LEAF else [leaf]))
    if path[:1] == (_RM_BACKBONE,):
        path = path[1:]
    *modules, leaf = path
    suffix = _HF_LEAF.get(leaf, leaf)
    if modules[:1] == ["layers"]:
        if layer is None:
            raise ValueError(f"params leaf {'/'.join(path)} is stacked: hf_name needs a layer")
        return f"model.layers.{layer}.{'.'.join(modules[1:])}.{suffix}"
    if modules[:1] == ["lm_head"]:
        return f"lm_head.{suffix}"
    return f"model.{'.'.join(modules)}.{suffix}"


def leaf_hf_names(tree: Any) -> dict[tuple[str, ...], list[str]]:
    """Every leaf path of a params-like pytree -> its HF names (one per layer if stacked)."""
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = tuple(str(getattr(k, "key", k)) for k in key_path)
        if is_stacked(path):
            out[path] = [hf_name(path, i) for i in range(np.shape(leaf)[0])]
        else:
            out[path] = [hf_name(path)]
    return out


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One jaxpost parameter and the HF tensor(s) it corresponds to."""

    path: tuple[str, ...]  # keys into the params pytree
    shape: tuple[int, ...]  # jaxpost shape (stacked: leading num_layers)
    stacked: bool  # one HF tensor per layer
    transpose: bool  # Linear kernel [in, out] <-> HF weight [out, in]

    def hf_name(self, layer: int | None = None) -> str:
        return hf_name(self.path, layer)

    def hf_names(self, num_layers: int) -> list[str]:
        if self.stacked:
            return [self.hf_name(i) for i in range(num_layers)]
        return [self.hf_name()]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """Shape of one HF tensor (one layer's, when stacked)."""
        shape = self.shape[1:] if self.stacked else self.shape
        return tuple(reversed(shape)) if self.transpose else tuple(shape)


@functools.lru_cache(maxsize=32)
def _entries(cfg: ModelConfig) -> tuple[_Entry, ...]:
    """Every parameter of `Transformer(cfg)`, in a stable order (pytree order)."""
    out = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]:
        path = tuple(k.key for k in key_path)
        out.append(_Entry(path=path, shape=tuple(leaf.shape), stacked=path[0] == "layers",
                          transpose=path[-1] == "kernel"))
    return tuple(out)


def _canonical(name: str) -> str:
    """HF name without the `model.` prefix (checkpoints of the bare model omit it)."""
    return name[len("model."):] if name.startswith("model.") else name


def _get(tree: dict, path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------- safetensors reading
@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    name: str  # as stored in the file
    file: str  # file name inside the folder
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def _tensor_info(path: str, name: str, meta: Any, data_start: int, size: int) -> _TensorInfo:
    """One header entry, checked against the file: a truncated file (an interrupted
    download or copy) is named with the first tensor whose bytes are not all there."""
    def bad(problem: str) -> HFCheckpointError:
        return HFCheckpointError(f"tensor {name!r} in {path}: {problem}", tensor=name)

    if not isinstance(meta, Mapping) or not {"dtype", "shape", "data_offsets"} <= set(meta):
        raise bad(f"malformed header entry {meta!r}; expected dtype, shape and data_offsets")
    if meta["dtype"] not in _ST_TO_NP:
        raise bad(f"has dtype {meta['dtype']}; supported: {sorted(_ST_TO_NP)}")
    shape, offsets = meta["shape"], meta["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise bad(f"malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"malformed data_offsets {offsets!r}")
    dtype = _ST_TO_NP[meta["dtype"]]
    begin, end = data_start + offsets[0], data_start + offsets[1]
    needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != needed:
        raise bad(f"shape {shape} of {meta['dtype']} needs {needed} bytes, but its "
                  f"data_offsets {offsets} span {end - begin}; the header is corrupt")
    if end > size:
        raise bad(f"its data ends at byte {end}, but the file has only {size} bytes: the file "
                  "is truncated (an interrupted download or copy?); fetch it again")
    return _TensorInfo(name=name, file=os.path.basename(path), dtype=dtype,
                       shape=tuple(shape), begin=begin, end=end)


def _read_header(path: str) -> list[_TensorInfo]:
    """Tensor descriptions of one safetensors file (reads only its header), each checked
    to lie inside the file."""
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise HFCheckpointError(f"{path}: too short to be a safetensors file")
        header_len = int.from_bytes(raw_len, "little")
        size = os.fstat(f.fileno()).st_size
        if header_len > size - 8:
            raise HFCheckpointError(
                f"{path}: header length {header_len} exceeds the file size {size}; "
                "is this a safetensors file (or a truncated one)?")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HFCheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    if not isinstance(header, Mapping):
        raise HFCheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_start = 8 + header_len
    return [_tensor_info(path, name, meta, data_start, size)
            for name, meta in header.items() if name != "__metadata__"]


def _read_json(path: str, what: str) -> dict:
    """A JSON object from `path`; any problem is an HFCheckpointError naming the file."""
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{path}: {what} is not valid JSON ({e.msg} at line "
                                f"{e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise HFCheckpointError(f"{path}: {what} is not UTF-8 text ({e})") from None
    if not isinstance(value, dict):
        raise HFCheckpointError(f"{path}: {what} holds a JSON {type(value).__name__}; "
                                "expected an object")
    return value


def read_hf_config(path: str | os.PathLike) -> dict:
    """The `config.json` dict of a Hugging Face folder.

    Raises:
      HFCheckpointError: no config.json, or one that is not a JSON object (naming its
        path, and line and column of a syntax error).
    """
    config_path = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.exists(config_path):
        raise HFCheckpointError(
            f"no {CONFIG_FILE} in {os.fspath(path)}; expected a Hugging Face model folder")
    return _read_json(config_path, CONFIG_FILE)


def hf_model_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face folder's `config.json` (fields overridden by
    `overrides`); errors name the file.

    Raises:
      HFCheckpointError: config.json is missing or not a JSON object.
      UnsupportedModelError: it describes a model jaxpost cannot represent, or lacks a
        required field, or holds a value of the wrong type.
    """
    config_path = os.path.join(os.fspath(path), CONFIG_FILE)
    hf_config = read_hf_config(path)
    try:
        return ModelConfig.from_hf_config(hf_config, **overrides)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{config_path}: {e}") from None
    except KeyError as e:
        raise UnsupportedModelError(
            f"{config_path}: required field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        raise UnsupportedModelError(f"{config_path}: {e}") from None


def _weight_files(path: str) -> list[str]:
    """The safetensors files of a folder: the index's, else `model.safetensors`."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        weight_map = _read_json(index, INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise HFCheckpointError(f"{index}: expected a 'weight_map' object of tensor name "
                                    "-> file name")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(path, name)):
                raise HFCheckpointError(
                    f"{index} lists {name}, which is not in {path}")
        return files
    if os.path.exists(os.path.join(path, SINGLE_FILE)):
        return [SINGLE_FILE]
    present = sorted(os.listdir(path)) if os.path.isdir(path) else []
    raise HFCheckpointError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (found: {present}); jaxpost reads "
        "safetensors weights only (save with safe_serialization=True)")


class _Reader:
    """Memory-mapped access to the tensors of a folder, by canonical HF name."""

    def __init__(self, path: str):
        self.path = path
        self.files = _weight_files(path)
        self.tensors: dict[str, _TensorInfo] = {}
        for fname in self.files:
            for info in _read_header(os.path.join(path, fname)):
                key = _canonical(info.name)
                if key in self.tensors:
                    other = self.tensors[key]
                    raise HFCheckpointError(
                        f"tensor {info.name!r} appears twice: in {other.file} (as "
                        f"{other.name!r}) and in {fname}", tensor=info.name)
                self.tensors[key] = info
        self._maps: dict[str, np.memmap] = {}

    def read(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor (no copy)."""
        info = self.tensors[_canonical(name)]
        if info.file not in self._maps:
            self._maps[info.file] = np.memmap(os.path.join(self.path, info.file), np.uint8, "r")
        raw = self._maps[info.file][info.begin:info.end]
        return raw.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._maps.clear()


def _validate(reader: _Reader, cfg: ModelConfig, entries: Sequence[_Entry]) -> None:
    """Checks names and shapes of every tensor before anything is read or allocated."""
    expected: dict[str, tuple[int, ...]] = {}
    for e in entries:
        for name in e.hf_names(cfg.num_layers):
            expected[_canonical(name)] = e.hf_shape
    for key, shape in expected.items():
        info = reader.tensors.get(key)
        if info is None:
            raise HFCheckpointError(
                f"tensor {_full_name(key)!r} is missing from {reader.path} (searched "
                f"{reader.files}); config.json ({cfg.family}, {cfg.num_layers} layers, "
                f"tie_word_embeddings={cfg.tie_embeddings}) needs it", tensor=_full_name(key))
        if info.shape != shape:
            raise HFCheckpointError(
                f"tensor {info.name!r} in {info.file} has shape {list(info.shape)}, but "
                f"config.json implies {list(shape)}", tensor=info.name)
    for key, info in reader.tensors.items():
        if key in expected or key.endswith(_IGNORED_SUFFIXES):
            continue
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # a tied model may carry a copy of the embedding
        raise HFCheckpointError(
            f"unexpected tensor {info.name!r} in {info.file}: {cfg.family} with "
            f"{cfg.num_layers} layers (attention_bias={cfg.attention_bias}, "
            f"qk_norm={cfg.qk_norm}) has no such parameter; check config.json", tensor=info.name)


def _full_name(key: str) -> str:
    return key if key.startswith("lm_head.") else "model." + key


# ------------------------------------------------------------------- device placement
def _put(host: np.ndarray, sharding: Sharding) -> jax.Array:
    """One host array onto `sharding` (works multi-host: each process fills its shards)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@functools.lru_cache(maxsize=256)
def _zeros_fn(shape: tuple[int, ...], dtype: np.dtype, sharding: Sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=256)
def _set_layer_fn(sharding: Sharding):
    return jax.jit(lambda stacked, i, x: stacked.at[i].set(x), out_shardings=sharding,
                   donate_argnums=0)


def _layer_sharding(sharding: Sharding, ndim: int) -> Sharding:
    """Sharding of one layer of a stacked parameter: the stacked spec minus `layers`."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, P(*spec[1:]))
    return sharding


def _host_tensor(reader: _Reader, name: str, entry: _Entry, dtype: np.dtype) -> np.ndarray:
    """One tensor in jaxpost layout and `dtype`: a single host copy out of the memory map."""
    x = reader.read(name)
    if entry.transpose:
        x = x.T
    out = np.empty(x.shape, dtype)
    np.copyto(out, x, casting="unsafe")
    return out


# ----------------------------------------------------------------------------- from_hf
def from_hf(path: str | os.PathLike, dtype: Any = jnp.float32, *, mesh: Mesh | None = None,
            rules=DEFAULT_RULES, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """Loads a local Hugging Face Llama / Qwen2 / Qwen3 folder.

    Args:
      path: folder with `config.json` and `model.safetensors` (or sharded files with
        `model.safetensors.index.json`).
      dtype: storage dtype of the returned parameters (`cfg.param_dtype` is set to it);
        tensors are cast from whatever dtype the files hold.
      mesh: place every parameter with `jaxpost.sharding.param_shardings(cfg, mesh,
        rules)`. None: everything on this process's first device.
      rules: logical-axis rules used with `mesh`.
      **config_overrides: `ModelConfig` fields to override (e.g. `dtype="bfloat16"`,
        `scan_layers=False`, `remat_policy="full"`).

    Returns:
      `(cfg, params)`: params is a plain nested dict of `jax.Array` with the structure of
      `init_params(cfg, rng)`.

    Raises:
      UnsupportedModelError: config.json describes an architecture jaxpost cannot run, or
        lacks a required field (the message names the file).
      HFCheckpointError: config.json is missing or not valid JSON (naming its path); a
        tensor is missing, unexpected, of the wrong shape, or cut off by a truncated file
        (the message names the tensor and the file); or the folder has no safetensors
        weights.
    """
    path = os.fspath(path)
    dtype_name = jnp.dtype(dtype).name
    if config_overrides.get("param_dtype", dtype_name) != dtype_name:
        raise ValueError(
            f"from_hf: dtype={dtype_name!r} conflicts with param_dtype="
            f"{config_overrides['param_dtype']!r}; pass only dtype")
    config_overrides["param_dtype"] = dtype_name
    cfg = hf_model_config(path, **config_overrides)
    np_dtype = np.dtype(jnp.dtype(dtype_name))

    entries = _entries(cfg)
    reader = _Reader(path)
    try:
        _validate(reader, cfg, entries)
        shardings = None if mesh is None else param_shardings(cfg, mesh, rules)
        single = SingleDeviceSharding(jax.local_devices()[0])
        params: dict = {}
        for e in entries:
            sharding = single if shardings is None else _get(shardings, e.path)
            if not e.stacked:
                _set(params, e.path, _put(_host_tensor(reader, e.hf_name(), e, np_dtype), sharding))
                continue
            stacked = _zeros_fn(e.shape, np_dtype, sharding)()
            set_layer = _set_layer_fn(sharding)
            layer_sharding = _layer_sharding(sharding, len(e.shape))
            for i in range(cfg.num_layers):
                layer = _put(_host_tensor(reader, e.hf_name(i), e, np_dtype), layer_sharding)
                stacked = set_layer(stacked, np.int32(i), layer)
                del layer
            _set(params, e.path, stacked)
    finally:
        reader.close()
    return cfg, params


# ------------------------------------------------------------------------------ to_hf
def _gather(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly sharded, possibly multi-host) array on the host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


@functools.partial(jax.jit, static_argnames="transpose")
def _hf_layout(x: jax.Array, layer: jax.Array | None, transpose: bool) -> jax.Array:
    """One layer of a stacked parameter (or the whole one), transposed to HF on device."""
    if layer is not None:
        x = x[layer]
    return x.T if transpose else x


def _hf_tensors(cfg: ModelConfig, params: dict) -> list[tuple[str, _Entry, int | None, np.dtype]]:
    """(HF name, entry, layer, dtype) of every tensor to write, in HF order."""
    entries = {e.path: e for e in _entries(cfg)}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    got = {tuple(k.key for k in kp): leaf for kp, leaf in flat}
    missing = sorted("/".join(p) for p in entries if p not in got)
    extra = sorted("/".join(p) for p in got if p not in entries)
    if missing or extra:
        hint = ""
        if any(p.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for p in extra):
            hint = ("; the params carry LoRA adapters: write `jaxpost.peft.lora.merge_adapters"
                    "(params, scale)` (merged) or `save_peft_adapter` (a PEFT adapter folder)")
        raise ValueError(
            f"to_hf: params do not match Transformer(cfg) for {cfg.family} with "
            f"{cfg.num_layers} layers: missing {missing}, unexpected {extra}{hint}")
    out = []
    for path, e in entries.items():
        leaf = got[path]
        if tuple(leaf.shape) != e.shape:
            raise ValueError(
                f"to_hf: params/{'/'.join(path)} has shape {tuple(leaf.shape)}, but cfg implies "
                f"{e.shape}")
        dt = np.dtype(leaf.dtype)
        if dt not in _NP_TO_ST:
            raise ValueError(f"to_hf: params/{'/'.join(path)} has dtype {dt}, which safetensors "
                             f"cannot store; supported: {sorted(map(str, _NP_TO_ST))}")
        for i in range(cfg.num_layers) if e.stacked else [None]:
            out.append((e.hf_name(i), e, i, dt))

    def order(item):  # HF order: embeddings, layers by index, final norm, head
        name, _, layer, _ = item
        group = 0 if "embed_tokens" in name else 1 if layer is not None else 3 if name.startswith(
            "lm_head") else 2
        return (group, layer or 0, name)
    return sorted(out, key=order)


def _shard_plan(tensors, max_bytes: int) -> list[list]:
    """Greedy split into files of at most `max_bytes` (a larger tensor gets its own file)."""
    shards: list[list] = [[]]
    size = 0
    for item in tensors:
        nbytes = math.prod(item[1].hf_shape) * item[3].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def _header_bytes(items) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, e, _, dt in items:
        nbytes = math.prod(e.hf_shape) * dt.itemsize
        header[name] = {"dtype": _NP_TO_ST[dt], "shape": list(e.hf_shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def _tensor_values(params: dict, items) -> Iterator[np.ndarray]:
    """The HF-layout host value of each item, gathered one at a time."""
    for _, e, layer, _ in items:
        x = _get(params, e.path)
        if isinstance(x, jax.Array):
            host = _gather(_hf_layout(x, None if layer is None else np.int32(layer), e.transpose))
        else:
            host = np.asarray(x if layer is None else x[layer])
            host = host.T if e.transpose else host
        yield np.ascontiguousarray(host)


def to_hf(cfg: ModelConfig, params: dict, path: str | os.PathLike, *,
          max_shard_size_bytes: int = 2**31) -> None:
    """Writes a Hugging Face folder that `transformers` loads (config, weights, generation).

    Tensors keep the dtype of `params` (config.json's `torch_dtype` says which). Sharded
    and multi-host arrays are gathered one tensor at a time; every process must call this
    (the gathers are collective) and only process 0 writes.

    Args:
      cfg: the model's config.
      params: parameter pytree of `Transformer(cfg)` (host or device, sharded or not).
      path: output folder (created if needed; existing files of the same names are
        overwritten).
      max_shard_size_bytes: above this many bytes of weights, write
        `model-0000i-of-0000n.safetensors` files and `model.safetensors.index.json`.

    Raises:
      ValueError: params do not have the structure or shapes `Transformer(cfg)` implies.
    """
    path = os.fspath(path)
    tensors = _hf_tensors(cfg, params)
    writer = jax.process_index() == 0
    dtype_name = str(tensors[0][3]) if tensors else cfg.param_dtype
    if writer:
        os.makedirs(path, exist_ok=True)
        hf_config = cfg.to_hf_config()
        hf_config["torch_dtype"] = dtype_name
        _write_json(os.path.join(path, CONFIG_FILE), hf_config)
        generation = {}
        if cfg.bos_token_id is not None:
            generation["bos_token_id"] = cfg.bos_token_id
        if cfg.eos_token_ids:
            generation["eos_token_id"] = (cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1
                                          else list(cfg.eos_token_ids))
        _write_json(os.path.join(path, GENERATION_CONFIG_FILE), generation)
        for stale in (SINGLE_FILE, INDEX_FILE):
            if os.path.exists(os.path.join(path, stale)):
                os.remove(os.path.join(path, stale))

    shards = _shard_plan(tensors, max_shard_size_bytes)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, items in zip(names, shards):
        f = open(os.path.join(path, fname), "wb") if writer else None
        try:
            if f:
                f.write(_header_bytes(items))
            for (_, _, _, dt), value in zip(items, _tensor_values(params, items)):
                if f:
                    f.write(value.astype(dt, copy=False).reshape(-1).view(np.uint8).data)
        finally:
            if f:
                f.close()
    if writer and len(shards) > 1:
        total = sum(math.prod(e.hf_shape) * dt.itemsize for _, e, _, dt in tensors)
        weight_map = {name: fname for fname, items in zip(names, shards) for name, *_ in items}
        _write_json(os.path.join(path, INDEX_FILE),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"jaxpost.to_hf:{path}")


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], *,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes host tensors to one safetensors file (e.g. a PEFT `adapter_model.safetensors`).

    The same format `to_hf` streams (8-byte little-endian header length, JSON header,
    raw little-endian data, 8-byte aligned), for small sets of tensors that fit in host
    memory at once. Written here rather than with the `safetensors` package so bfloat16
    works on every numpy version (through `ml_dtypes`) and nothing needs torch.

    Args:
      path: the file to write (overwritten).
      tensors: name -> array (numpy or `jax.Array`), in the order to store them.
      metadata: the header's `__metadata__` strings; default `{"format": "pt"}`, which
        `transformers` and PEFT expect of PyTorch-side files.

    Raises:
      ValueError: a tensor's dtype has no safetensors tag (the message names it).
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    values, offset = [], 0
    for name, x in tensors.items():
        host = np.ascontiguousarray(_gather(x) if isinstance(x, jax.Array) else np.asarray(x))
        if host.dtype not in _NP_TO_ST:
            raise ValueError(f"write_safetensors: tensor {name!r} has dtype {host.dtype}, which "
                             f"safetensors cannot store; supported: {sorted(map(str, _NP_TO_ST))}")
        header[name] = {"dtype": _NP_TO_ST[host.dtype], "shape": list(host.shape),
                        "data_offsets": [offset, offset + host.nbytes]}
        offset += host.nbytes
        values.append(host)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(os.fspath(path), "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for host in values:
            f.write(host.reshape(-1).view(np.uint8).data)
