"""A trainable gaze predictor: a BiLSTM over subword tokens, pooled per word.

The architecture of eyetrackpy's ET1 predictor (ALGORITHMS.md 2.1; Huang & Hollenstein
2023): token embeddings -> bidirectional LSTM -> MLP, here with one output per
feature; a word's prediction reads the mean of its tokens' BiLSTM states, so both the
word's spelling and its neighbours (spillover) inform it. Trained by
`configs/gaze_predictor.py` (`jaxpost.train.gaze_predictor`) with a masked MSE on
standardised features; `RegressorPredictor.from_workdir` loads a run as a predictor.

Batches: `tokens [B, L]` int32, `token_word [B, L]` (the word index of each token, -1 for
none), `targets [B, W, k]` (standardised), `word_mask [B, W]`
(`jaxpost.data.eye_tracking.EyeTrackingBatches`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RegressorConfig:
    """The regressor's shape and the feature normalisation it was trained with."""

    vocab_size: int  # the tokenizer's
    features: tuple[str, ...] = ("TRT",)  # predicted features, in output order
    embed_dim: int = 64  # token embedding width
    hidden_dim: int = 64  # LSTM state width per direction
    dropout: float = 0.1  # on the pooled word states, in training
    feature_mean: tuple[float, ...] = ()  # per feature, of the training words (un-standardise)
    feature_std: tuple[float, ...] = ()  # per feature, of the training words

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RegressorConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in d.items() if k in fields})


class GazeRegressor(nn.Module):
    """`(tokens [B, L], token_word [B, L], num_words) -> standardised features [B, W, k]`."""

    cfg: RegressorConfig

    @nn.compact
    def __call__(self, tokens, token_word, num_words: int, *, deterministic: bool = True):
        c = self.cfg
        valid = token_word >= 0
        x = nn.Embed(c.vocab_size, c.embed_dim, name="embed")(tokens)
        lengths = jnp.sum(tokens >= 0, axis=-1)  # full rows: padding is masked at pooling
        h = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(c.hidden_dim), name="forward"),
                             nn.RNN(nn.OptimizedLSTMCell(c.hidden_dim), name="backward"),
                             name="bilstm")(x, seq_lengths=lengths)
        onehot = jax.nn.one_hot(jnp.where(valid, token_word, -1), num_words, dtype=h.dtype)
        counts = jnp.maximum(jnp.sum(onehot, axis=1), 1.0)  # [B, W]
        words = jnp.einsum("blw,bld->bwd", onehot, h) / counts[..., None]
        words = nn.Dropout(c.dropout)(words, deterministic=deterministic)
        y = nn.relu(nn.Dense(c.hidden_dim, name="mlp")(words))
        return nn.Dense(len(c.features), name="head")(y)


def init_regressor(cfg: RegressorConfig, rng: jax.Array, max_tokens: int = 8,
                   max_words: int = 4) -> dict:
    """Random params of `GazeRegressor(cfg)` (their shapes do not depend on the lengths)."""
    tokens = jnp.zeros((1, max_tokens), jnp.int32)
    return GazeRegressor(cfg).init(rng, tokens, jnp.zeros_like(tokens), max_words)["params"]


def make_regressor_loss(cfg: RegressorConfig):
    """`loss_fn(params, batch, rng) -> (sum of squared errors, count, aux)` over the valid
    (word, feature) entries; `rng` None means evaluation (no dropout). aux: `mse` and
    `mse_mean_predictor` (predicting 0, i.e. the training mean) as (sum, count) pairs."""
    model = GazeRegressor(cfg)

    def loss_fn(params, batch, rng):
        targets = batch["targets"]
        kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
        pred = model.apply({"params": params}, batch["tokens"], batch["token_word"],
                           targets.shape[1], deterministic=rng is None, **kwargs)
        m = jnp.broadcast_to(batch["word_mask"][..., None], targets.shape).astype(jnp.float32)
        sq = jnp.where(m > 0, (pred.astype(jnp.float32) - targets) ** 2, 0.0)
        count = jnp.sum(m)
        base = jnp.sum(jnp.where(m > 0, targets ** 2, 0.0))
        aux = {"mse": (jnp.sum(sq), count), "mse_mean_predictor": (base, count)}
        return jnp.sum(sq), count, aux

    return loss_fn


class RegressorPredictor:
    """A trained `GazeRegressor` behind the predictor interface (`predict_words`)."""

    def __init__(self, cfg: RegressorConfig, params: Any, tokenizer, max_tokens: int = 512):
        if len(cfg.feature_mean) != len(cfg.features) or len(cfg.feature_std) != len(cfg.features):
            raise ValueError(f"RegressorConfig has features {cfg.features} but "
                             f"{len(cfg.feature_mean)} means and {len(cfg.feature_std)} stds")
        if "TRT" not in cfg.features:
            raise ValueError(f"a gaze predictor must predict TRT; this one predicts {cfg.features}")
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.features = tuple(cfg.features)
        self.max_tokens = max_tokens
        self._mean = np.asarray(cfg.feature_mean, np.float32)
        self._std = np.asarray(cfg.feature_std, np.float32)
        model = GazeRegressor(cfg)
        self._apply = jax.jit(lambda p, t, tw, w: model.apply({"params": p}, t, tw, w),
                              static_argnums=3)

    def __repr__(self) -> str:
        return f"RegressorPredictor(features={self.features})"

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None) -> RegressorPredictor:
        """The regressor of a `gaze_predictor` training run (its latest checkpoint)."""
        from jaxpost.checkpoint import open_run
        from jaxpost.tokenizer import load_tokenizer

        with open_run(workdir, step) as run:
            params = run.params()
            meta = run.metadata()
        if "gaze_regressor" not in meta:
            raise ValueError(f"{workdir} is not a gaze_predictor run (its checkpoint metadata "
                             "has no 'gaze_regressor')")
        info = meta["gaze_regressor"]
        params = jax.tree.map(jnp.asarray, params)
        return cls(RegressorConfig.from_dict(info["config"]), params,
                   load_tokenizer(info["tokenizer"]))

    def predict_words(self, words: Sequence[str], **unused) -> dict[str, np.ndarray]:
        """Feature -> `[len(words)]` in the corpus's units (ms for durations)."""
        from jaxpost.data.eye_tracking import encode_sentence

        del unused  # surprisal_bits: this predictor reads the text itself
        n = len(words)
        if n == 0:
            return {f: np.zeros((0,), np.float32) for f in self.features}
        ids_len = len(self.tokenizer.encode(" ".join(words)))
        length = 1 << max(4, (ids_len - 1).bit_length())  # buckets: few compilations
        width = 1 << max(3, (n - 1).bit_length())
        if length > self.max_tokens:
            raise ValueError(f"{n} words are {ids_len} tokens; this predictor takes at most "
                             f"{self.max_tokens} (split the text)")
        tokens, tw, _ = encode_sentence(self.tokenizer, list(words), length, width)
        pred = np.asarray(self._apply(self.params, tokens[None], tw[None], width))[0, :n]
        values = pred * self._std + self._mean
        return {f: values[:, i].astype(np.float32) for i, f in enumerate(self.features)}


__all__ = ["GazeRegressor", "RegressorConfig", "RegressorPredictor", "init_regressor",
           "make_regressor_loss"]
