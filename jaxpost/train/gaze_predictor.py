"""Training the BiLSTM gaze predictor on an eye-tracking CSV, on the shared loop.

Data: `jaxpost.data.eye_tracking` (CSV layout of ZuCo / CMCL 2021, with a synthetic
corpus shipped); model and loss: `jaxpost.rl.gaze.regressor`. Held-out evaluation
reports the MSE of the standardised features next to that of the mean predictor
(`eval_mse`, `eval_mse_mean_predictor`, `eval_r2 = 1 - mse / mse_mean_predictor`). The
checkpoint metadata's `gaze_regressor` entry (config with the feature normalisation,
tokenizer) is what `RegressorPredictor.from_workdir` reads.

    python -m jaxpost.train --config=configs/gaze_predictor.py --config.workdir=/tmp/gaze_rp
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxpost import sharding as sh
from jaxpost.data import eye_tracking as et
from jaxpost.optim import OptimizerConfig
from jaxpost.rl.gaze.regressor import RegressorConfig, init_regressor, make_regressor_loss
from jaxpost.train.common import MeshSection, ParamsPlan, RecipeConfig, make_mesh, run_recipe


@dataclasses.dataclass(frozen=True)
class GazeDataSection:
    """The eye-tracking CSV and how its sentences become batches."""

    csv: str = et.SYNTHETIC_CSV  # word-per-row CSV (sentence_id, word_id, word, features)
    features: tuple[str, ...] = ()  # feature columns to learn (empty: every known one in the file); TRT required
    tokenizer: str = "byte"  # the regressor's subword tokenizer: "byte", an HF folder or a sentencepiece .model
    heldout_fraction: float = 0.1  # every round(1/f)-th sentence (file order) is held out
    batch_size: int = 32  # sentences per step
    max_tokens: int = 96  # tokens per sentence row (longer: trailing words dropped)
    max_words: int = 24  # words per sentence row

    def __post_init__(self):
        for name in ("batch_size", "max_tokens", "max_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclasses.dataclass(frozen=True)
class RegressorSection:
    """The BiLSTM's size."""

    embed_dim: int = 64  # token embedding width
    hidden_dim: int = 64  # LSTM state per direction
    dropout: float = 0.1  # on pooled word states


@dataclasses.dataclass(frozen=True)
class GazePredictorConfig(RecipeConfig):
    """A gaze predictor (BiLSTM regressor) fitted to eye-tracking features."""

    trainer: str = "gaze_predictor"  # which trainer runs this config
    data: GazeDataSection = GazeDataSection()
    regressor: RegressorSection = RegressorSection()
    optimizer: OptimizerConfig = OptimizerConfig(lr=3e-3)
    mesh: MeshSection = MeshSection()

    identity_keys = RecipeConfig.identity_keys + ("data.csv", "data.features", "data.tokenizer")


class GazePredictorTask:
    """Sentence batches, the masked MSE, held-out MSE against the mean predictor."""

    def __init__(self, cfg: GazePredictorConfig, reg_cfg: RegressorConfig, tokenizer, mesh,
                 train_sentences, heldout_sentences, mean, std):
        d = cfg.data
        make = lambda s, shuffle: et.EyeTrackingBatches(  # noqa: E731
            s, tokenizer, mean, std, batch_size=d.batch_size, max_tokens=d.max_tokens,
            max_words=d.max_words, seed=cfg.seed, shuffle=shuffle)
        self.iterator = make(train_sentences, True)
        self._heldout = make(heldout_sentences, False).batches() if heldout_sentences else []
        self.loss_fn = make_regressor_loss(reg_cfg)
        self._eval = jax.jit(lambda p, b: self.loss_fn(p, b, None))
        self.mesh = mesh

    def next_batch(self, state):
        del state
        return next(self.iterator), {"epoch": float(self.iterator.epoch)}

    def data_state(self) -> dict:
        return self.iterator.get_state()

    def set_data_state(self, state: dict) -> None:
        self.iterator.set_state(state)

    def evaluate(self, params, step: int) -> dict[str, float]:
        del step
        if not self._heldout:
            return {}
        sums = {"mse": 0.0, "mse_mean_predictor": 0.0}
        total = 0.0
        for batch in self._heldout:
            _, count, aux = jax.device_get(self._eval(params, sh.shard_batch(batch, self.mesh)))
            total += float(count)
            for k in sums:
                sums[k] += float(aux[k][0])
        out = {k: v / max(total, 1.0) for k, v in sums.items()}
        out["r2"] = 1.0 - out["mse"] / max(out["mse_mean_predictor"], 1e-12)
        return out


def train(cfg: GazePredictorConfig):
    """Runs (or resumes) a gaze-predictor recipe; returns the loop's result."""
    from jaxpost.tokenizer import load_tokenizer

    if cfg.freeze or cfg.trainable or cfg.freeze_preset or cfg.lora.enabled:
        raise ValueError("freeze / trainable / freeze_preset / lora apply to transformer "
                         "recipes; the gaze regressor trains all its parameters")
    d, r = cfg.data, cfg.regressor
    corpus = et.read_eye_tracking_csv(d.csv, d.features or None)
    train_s, held_s = et.split_sentences(corpus, d.heldout_fraction)
    mean, std = et.Corpus(corpus.features, tuple(train_s)).stats()
    tokenizer = load_tokenizer(d.tokenizer)
    reg_cfg = RegressorConfig(
        vocab_size=tokenizer.vocab_size, features=corpus.features, embed_dim=r.embed_dim,
        hidden_dim=r.hidden_dim, dropout=r.dropout,
        feature_mean=tuple(float(x) for x in mean), feature_std=tuple(float(x) for x in std))
    mesh = make_mesh(cfg.mesh)
    rng = jax.random.key(cfg.seed)
    abstract = jax.eval_shape(lambda: init_regressor(reg_cfg, rng))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, abstract)
    plan = ParamsPlan(
        model_cfg=reg_cfg,
        init=lambda: jax.jit(lambda: init_regressor(reg_cfg, rng), out_shardings=shardings)(),
        abstract=abstract, shardings=shardings, mask=jax.tree.map(lambda _: True, abstract),
        lora=cfg.lora)
    task = GazePredictorTask(cfg, reg_cfg, tokenizer, mesh, train_s, held_s, mean, std)
    return run_recipe(cfg, task, plan, mesh, gaze_regressor={
        "config": dataclasses.asdict(reg_cfg), "tokenizer": d.tokenizer,
        "num_train_sentences": len(train_s), "num_heldout_sentences": len(held_s)})


__all__ = ["GazeDataSection", "GazePredictorConfig", "GazePredictorTask", "RegressorSection",
           "train"]
