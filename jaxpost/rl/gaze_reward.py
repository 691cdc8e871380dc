"""GazeReward (Lopez-Cardona et al., ICLR 2025; ../shared/ALGORITHMS.md §2.1): predicted
eye-tracking features fed into a reward model, added to the token embeddings (GazeAdd)
or placed before the text between `<eye/>` and `</eye>` (GazeConcat).

Features are per-token arrays `[B, T, k]` aligned with the reward model's tokens (k
features per token, 0 on special tokens and padding), made on the host by
`GazeFeaturizer` (a gaze predictor's word values split over the words' tokens,
`jaxpost.rl.gaze`). The trainable part lives under the reward model's `"gaze"` params:

- `projector`: the feature projector of the paper's `reward_model_base.py`,
  `e_t = LN_H(Dropout(p2)(Linear(128->H)(Dropout(p1)(ReLU(LN_128(Linear(k->128)(f_t)))))))`,
  with PyTorch's default initialisation (uniform ±1/sqrt(fan_in) kernels *and* biases:
  with a zero bias and k = 1, `LN_128(w·f)` would be `sign(f)·LN(w)`, blind to the
  feature's size) and PyTorch's LayerNorm epsilon 1e-5;
- `separators` (GazeConcat only): the embeddings of `<eye/>` and `</eye>`, i.e. the two
  rows by which the embedding table grows. They are kept beside the backbone, so a
  backbone from an HF folder or an SFT run loads unchanged and freeze rules on
  `embed_tokens` do not reach them; the concatenated sequence looks its ids up in the
  grown table `embed_tokens ++ separators`, where `<eye/>` is id `vocab_size` and
  `</eye>` is `vocab_size + 1`.

GazeAdd: `inputs_embeds_t = emb(x_t) + e_t` on real tokens (padding gets nothing).
GazeConcat: a row with n real tokens becomes
`[<eye/>, e_1 .. e_n, </eye>, emb(x_1) .. emb(x_n)]` (2n + 2 positions, then padding to
2T + 2), positions 0 .. 2n+1, segment ids 1 on those positions; the score is read at the
last text token as for a plain reward model. The paper runs GazeConcat on the gaze
predictor's own tokens; here both injections use the features remapped to the reward
model's tokens (one data path; the concatenated block then has the text's length).
Mode "off" is the plain reward model (the ablation): no gaze params, features ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models import ModelConfig, embed_tokens
from jaxpost.models.layers import dtype_of

GAZE = "gaze"  # params key of the gaze part of a reward model
MODES = ("off", "add", "concat")
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, as in the paper's projector

__all__ = [
    "GAZE",
    "LAYER_NORM_EPS",
    "MODES",
    "GazeFeaturizer",
    "GazeProjector",
    "GazeSpec",
    "concat_layout",
    "featurizer_from_spec",
    "gaze_inputs",
    "gaze_logical_axes",
    "gaze_shapes",
    "init_gaze",
    "load_gaze_predictor",
    "project",
]


@dataclasses.dataclass(frozen=True)
class GazeSpec:
    """How a reward model uses gaze features (what its params and forward pass need)."""

    mode: Literal["off", "add", "concat"] = "off"  # "off": plain reward model (ablation)
    num_features: int = 1  # k, features per token
    width: int = 128  # the projector's inner width
    dropout: tuple[float, float] = (0.1, 0.3)  # (p1 after ReLU, p2 after Linear(128->H)): the paper's fp_dropout
    output_scale: float = 1.0  # initial scale of the last LayerNorm (1: PyTorch's init, the paper's; small: e starts small next to the token embeddings)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"gaze.mode={self.mode!r}; expected one of {MODES}")
        if self.num_features < 1 or self.width < 1:
            raise ValueError(f"gaze: num_features ({self.num_features}) and width "
                             f"({self.width}) must be >= 1")
        if len(self.dropout) != 2 or not all(0.0 <= p < 1.0 for p in self.dropout):
            raise ValueError(f"gaze.dropout={self.dropout!r}; expected two rates in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


# ---------------------------------------------------------------------------- projector
def _torch_uniform(fan_in: int):
    """PyTorch's nn.Linear default for kernels and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class GazeProjector(nn.Module):
    """Features [..., k] -> vectors [..., hidden] (float32), the paper's projector."""

    hidden: int
    width: int = 128
    dropout: tuple[float, float] = (0.1, 0.3)
    output_scale: float = 1.0  # initial scale of norm2

    @nn.compact
    def __call__(self, features: jax.Array, deterministic: bool = True) -> jax.Array:
        k = features.shape[-1]
        h = nn.Dense(self.width, kernel_init=_torch_uniform(k), bias_init=_torch_uniform(k),
                     name="fc1")(features.astype(jnp.float32))
        h = nn.LayerNorm(epsilon=LAYER_NORM_EPS, name="norm1")(h)
        h = nn.Dropout(self.dropout[0])(jax.nn.relu(h), deterministic=deterministic)
        h = nn.Dense(self.hidden, kernel_init=_torch_uniform(self.width),
                     bias_init=_torch_uniform(self.width), name="fc2")(h)
        h = nn.Dropout(self.dropout[1])(h, deterministic=deterministic)
        return nn.LayerNorm(epsilon=LAYER_NORM_EPS, name="norm2",
                            scale_init=nn.initializers.constant(self.output_scale))(h)


def _projector(spec: GazeSpec, cfg: ModelConfig) -> GazeProjector:
    return GazeProjector(cfg.hidden_size, spec.width, tuple(spec.dropout), spec.output_scale)


def project(spec: GazeSpec, cfg: ModelConfig, gaze_params: dict, features: jax.Array,
            rng: jax.Array | None = None) -> jax.Array:
    """The projected features `e` [B, T, hidden] (float32); dropout only with an rng."""
    rngs = None if rng is None else {"dropout": rng}
    return _projector(spec, cfg).apply({"params": gaze_params["projector"]}, features,
                                       deterministic=rng is None, rngs=rngs)


# ------------------------------------------------------------------------------- params
def init_gaze(spec: GazeSpec, cfg: ModelConfig, rng: jax.Array) -> dict:
    """Gaze params: `{"projector": ...}` (+ `"separators"` [2, hidden] for GazeConcat,
    N(0, initializer_range²) like the embedding table's rows); `{}` when off."""
    if not spec.enabled:
        return {}
    return _jitted_init(spec, cfg)(rng)


@functools.lru_cache(maxsize=32)
def _jitted_init(spec: GazeSpec, cfg: ModelConfig):
    """One jitted init per (spec, config): op-by-op Flax init is seconds on a CPU."""
    def init(rng):
        k1, k2 = jax.random.split(rng)
        projector = _projector(spec, cfg).init(k1, jnp.zeros((1, 1, spec.num_features)))
        dtype = dtype_of(cfg.param_dtype)
        out = {"projector": jax.tree.map(lambda x: x.astype(dtype), projector["params"])}
        if spec.mode == "concat":
            out["separators"] = (cfg.initializer_range * jax.random.normal(
                k2, (2, cfg.hidden_size), jnp.float32)).astype(dtype)
        return out
    return jax.jit(init)


def gaze_shapes(spec: GazeSpec, cfg: ModelConfig) -> dict:
    """`jax.ShapeDtypeStruct` of every gaze parameter."""
    return jax.eval_shape(lambda: init_gaze(spec, cfg, jax.random.key(0)))


def gaze_logical_axes(spec: GazeSpec, cfg: ModelConfig) -> dict:
    """Logical axes: all None (replicated; the projector is 128·(k + hidden) + 6·hidden
    numbers, negligible next to one layer)."""
    return jax.tree.map(lambda s: (None,) * len(s.shape), gaze_shapes(spec, cfg))


# ------------------------------------------------------------------------------ injection
def concat_layout(tokens: jax.Array, segment_ids: jax.Array, vocab_size: int) -> dict:
    """Where GazeConcat puts what: `[<eye/>, gaze_1..n, </eye>, x_1..n]` per row.

    Args:
        tokens: int32 [B, T], one sequence per row (real tokens where `segment_ids` != 0,
            padded on either side).
        segment_ids: int32 [B, T].
        vocab_size: the backbone's table size V; `<eye/>` is id V, `</eye>` V + 1.

    Returns:
        A dict of [B, 2T + 2] arrays: `tokens` (ids into the grown table; 0 where a gaze
        vector or padding goes), `is_gaze` (bool), `gaze_index` (int32: the source
        position in [0, T) of the gaze vector placed there; 0 elsewhere), `segment_ids`
        (int32, 1 on the 2n + 2 used positions, 0 after; an all-padding row stays empty),
        `positions` (int32, 0..2T+1).
    """
    b, t = tokens.shape
    length = 2 * t + 2
    valid = segment_ids != 0
    n = jnp.sum(valid, axis=1, dtype=jnp.int32)[:, None]  # [B, 1]
    order = jnp.argsort(~valid, axis=1, stable=True).astype(jnp.int32)  # real tokens first
    j = jnp.arange(length, dtype=jnp.int32)[None, :]
    is_open = (j == 0) & (n > 0)
    is_gaze = (j >= 1) & (j <= n)
    is_close = (j == n + 1) & (n > 0)
    is_text = (j >= n + 2) & (j <= 2 * n + 1)
    gaze_index = jnp.take_along_axis(order, jnp.broadcast_to(jnp.clip(j - 1, 0, t - 1), (b, length)),
                                     axis=1)
    text_index = jnp.take_along_axis(order, jnp.clip(j - n - 2, 0, t - 1), axis=1)
    text = jnp.take_along_axis(tokens, text_index, axis=1)
    ids = jnp.where(is_text, text, 0)
    ids = jnp.where(is_open, vocab_size, jnp.where(is_close, vocab_size + 1, ids))
    used = is_open | is_gaze | is_close | is_text
    return {"tokens": ids.astype(jnp.int32), "is_gaze": is_gaze,
            "gaze_index": jnp.where(is_gaze, gaze_index, 0).astype(jnp.int32),
            "segment_ids": used.astype(jnp.int32),
            "positions": jnp.broadcast_to(j, (b, length)).astype(jnp.int32)}


def gaze_inputs(spec: GazeSpec, cfg: ModelConfig, params: dict, tokens: jax.Array,
                segment_ids: jax.Array, positions: jax.Array | None, features: jax.Array,
                rng: jax.Array | None = None, *, backbone: str = "model"):
    """`(tokens, segment_ids, positions, inputs_embeds)` of the backbone call of a gaze
    reward model (`spec.mode` "add" or "concat"); see the module docstring.

    Args:
        params: the reward model's params (`backbone`, `"score"`, `"gaze"`).
        features: float [B, T, k] aligned with `tokens`.
        rng: projector dropout (None: deterministic).
    """
    if features.shape != tokens.shape + (spec.num_features,):
        raise ValueError(f"gaze features have shape {features.shape}; expected tokens' "
                         f"{tokens.shape} + ({spec.num_features},) features")
    table = params[backbone]["embed_tokens"]["embedding"]
    e = project(spec, cfg, params[GAZE], features, rng)
    if spec.mode == "add":
        x = embed_tokens(cfg, table, tokens)
        e = jnp.where((segment_ids != 0)[..., None], e, 0.0)
        return tokens, segment_ids, positions, x + e.astype(x.dtype)
    if spec.mode != "concat":
        raise ValueError(f"gaze_inputs: mode {spec.mode!r} uses no gaze")
    layout = concat_layout(tokens, segment_ids, cfg.vocab_size)
    grown = jnp.concatenate([table, params[GAZE]["separators"].astype(table.dtype)], axis=0)
    x = embed_tokens(cfg, grown, layout["tokens"])
    placed = jnp.take_along_axis(e, layout["gaze_index"][..., None], axis=1)
    x = jnp.where(layout["is_gaze"][..., None], placed.astype(x.dtype), x)
    return layout["tokens"], layout["segment_ids"], layout["positions"], x


# ------------------------------------------------------------------------- host side
class GazeFeaturizer:
    """Text -> per-token gaze features `[len(tokenizer.encode(text)), k]` (float32).

    Two kinds of predictor:
    - word-level (the contract of `jaxpost.rl.gaze`: `predict_words(words) -> {feature:
      one value per word}`): the values are remapped to the tokenizer's tokens with
      `jaxpost.rl.gaze`'s word -> token remap (a word's value split evenly over its
      tokens; special and chat-template tokens get 0);
    - token-level (`token_features(tokenizer, text) -> {feature: one value per token of
      tokenizer.encode(text)}`): used as they come (a regressor over the reward model's
      own subword tokens).
    Each feature is then divided by its `scale`, so the projector sees O(1) values.

    Args:
        tokenizer: the reward model's tokenizer.
        predictor: a word-level or token-level predictor (see above).
        features: the feature names to use, in order (k = len(features)).
        scale: one divisor per feature (or one for all).
    """

    def __init__(self, tokenizer, predictor, features: Sequence[str] = ("TRT",),
                 scale: float | Sequence[float] = 1.0):
        if not (hasattr(predictor, "token_features") or hasattr(predictor, "predict_words")):
            raise TypeError(f"gaze predictor {predictor!r} has neither predict_words(words) "
                            "nor token_features(tokenizer, text)")
        self.tokenizer, self.predictor = tokenizer, predictor
        self.features = tuple(features)
        if not self.features:
            raise ValueError("gaze features: name at least one (e.g. ('TRT',))")
        scale = (scale,) if np.isscalar(scale) else tuple(scale)
        scale = scale * len(self.features) if len(scale) == 1 else scale
        if len(scale) != len(self.features) or any(s <= 0 for s in scale):
            raise ValueError(f"gaze scale {scale!r}: one positive divisor per feature "
                             f"{self.features}")
        self.scale = np.asarray(scale, np.float32)

    @property
    def num_features(self) -> int:
        return len(self.features)

    def __repr__(self) -> str:
        return f"GazeFeaturizer({self.predictor!r}, features={self.features})"

    def __call__(self, text: str) -> np.ndarray:
        if hasattr(self.predictor, "token_features"):
            per_token = self.predictor.token_features(self.tokenizer, text)
        else:
            per_token = _words_to_tokens(self.predictor, self.tokenizer, text, self.features)
        n = len(self.tokenizer.encode(text))
        return _check_token_features(per_token, self.features, n, text) / self.scale


def _words_to_tokens(predictor, tokenizer, text: str, features: tuple[str, ...]) -> dict:
    """A word-level predictor's values on the tokens of `text` (jaxpost.rl.gaze's remap)."""
    from jaxpost.rl.gaze import text_token_features

    ids, per_token = text_token_features(predictor, tokenizer, text, features)
    if list(ids) != list(tokenizer.encode(text)):  # the remap encodes with offsets
        raise ValueError(f"{tokenizer!r}: encode_with_offsets({text[:40]!r}...) gives other ids "
                         "than encode(); gaze features would not line up with the tokens")
    return per_token


def _check_token_features(per_token: Any, names: tuple[str, ...], n: int, text: str
                          ) -> np.ndarray:
    missing = [f for f in names if f not in per_token]
    if missing:
        raise ValueError(f"the gaze predictor gives no {missing} (it has {sorted(per_token)})")
    out = np.stack([np.asarray(per_token[f], np.float32).reshape(-1) for f in names], axis=-1)
    if out.shape != (n, len(names)):
        raise ValueError(f"gaze features of {text[:40]!r} have shape {out.shape}; expected "
                         f"one row per token ({n}, {len(names)})")
    return out


def load_gaze_predictor(spec: str):
    """A gaze predictor by name: `"psycholinguistic"` or `"regressor:WORKDIR"`
    (`jaxpost.rl.gaze.load_predictor`), or a spec `"package.module:Class(key=value)"` /
    `"package.module:object"` of any object with `predict_words` or `token_features`."""
    from jaxpost.rl.gaze import load_predictor
    from jaxpost.rl.rewards import resolve_object

    if spec == "psycholinguistic" or spec.startswith("regressor:"):
        return load_predictor(spec)
    if ":" not in spec:
        raise ValueError(f"gaze.predictor={spec!r}: expected 'psycholinguistic', "
                         "'regressor:WORKDIR' or 'package.module:factory(key=value)'")
    return resolve_object(spec, "gaze predictor")[1]


def featurizer_from_spec(tokenizer, predictor: str, features: Sequence[str],
                         scale: float | Sequence[float] = 1.0) -> GazeFeaturizer:
    """A `GazeFeaturizer` whose predictor is named by a spec (`load_gaze_predictor`)."""
    return GazeFeaturizer(tokenizer, load_gaze_predictor(predictor), features, scale)
