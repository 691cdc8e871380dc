"""Bradley–Terry reward models: a scalar head on a transformer, its loss, and its use as a
reward function.

Model. The params are `{"model": <Transformer params>, "score": {"kernel": [D, 1],
"bias": [1]}}`: the backbone is a whole `jaxpost.models.Transformer` (its `lm_head`, if
any, is kept but unused, so an SFT checkpoint or an HF folder loads into it unchanged),
and the score of a sequence is the head applied to the final normed hidden state of its
*last real token* (the last position whose segment id is non-zero). One sequence per
row, padded on either side; padding never changes a score.

Loss (Bradley & Terry, 1952; InstructGPT, Ouyang et al. 2022): for a pair with scores
`r_c` (chosen) and `r_r` (rejected), `-log sigmoid(r_c - r_r)`, summed over pairs with
the number of pairs as the normaliser (the `(sum, count)` convention of
`jaxpost.train.step`). Optionally `+ c * (r_c + r_r)^2` (TRL's
`center_rewards_coefficient`, Eisenstein et al. 2023) keeps scores centred on zero.
Metrics: `accuracy` (pairs with `r_c > r_r`; a tie counts 1/2), `margin` (mean
`r_c - r_r`), `reward_chosen`, `reward_rejected` (mean scores).

Text. A scored sequence is `encode(prompt + completion)` (BOS prepended when the
tokenizer adds one and the text does not start with it) followed by EOS: the same rule in
training (`encode_sequence`, which lives in `jaxpost.data.preference` with `pad_sequences`
and is re-exported here) and when scoring GRPO completions (`RewardModelReward`), whose
prompts are already chat-rendered and whose completions are decoded without special
tokens.

GazeReward (`jaxpost.rl.gaze_reward`): a reward model may also take per-token gaze
features `[B, T, k]` (params gain a `"gaze"` entry; `reward_scores(..., gaze=spec,
gaze_features=f)`); its checkpoint metadata says so (`reward_model.gaze`), and
`RewardModelReward` then computes the features of each scored text with the recorded
predictor. With `GazeSpec(mode="off")` everything here is the plain reward model.

Use in GRPO (`reward_fns` in a recipe), plain or gaze alike:

    "jaxpost.rl.reward_model:from_workdir(workdir='/tmp/rm')"
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import sharding as sh
from jaxpost.checkpoint import model_config_from_metadata, open_run
from jaxpost.data.preference import (
    encode_sequence,
    encode_sequence_features,
    pad_features,
    pad_sequences,
)
from jaxpost.models import ModelConfig, Transformer, param_logical_axes, param_shapes
from jaxpost.models.layers import dropout_rngs, dtype_of
from jaxpost.rl import gaze_reward as gz
from jaxpost.rl.gaze_reward import GAZE, GazeSpec

log = logging.getLogger(__name__)

BACKBONE = "model"  # params key of the transformer
HEAD = "score"  # params key of the scalar head

__all__ = [
    "BACKBONE",
    "GAZE",
    "HEAD",
    "GazeSpec",
    "RewardModelReward",
    "bradley_terry_loss",
    "encode_sequence",
    "from_workdir",
    "gaze_spec_of",
    "head_logical_axes",
    "head_shapes",
    "init_head",
    "last_token_index",
    "load_reward_model",
    "make_reward_model_loss",
    "pad_sequences",
    "reward_scores",
    "rm_param_logical_axes",
    "rm_param_shapes",
    "rm_param_shardings",
]


# ------------------------------------------------------------------------------- params
def head_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of the score head: kernel [hidden, 1], bias [1] (in `param_dtype`)."""
    dtype = dtype_of(cfg.param_dtype)
    return {"kernel": jax.ShapeDtypeStruct((cfg.hidden_size, 1), dtype),
            "bias": jax.ShapeDtypeStruct((1,), dtype)}


def head_logical_axes() -> dict[str, tuple[str | None, ...]]:
    """Logical axes of the head: the kernel's input dimension is the model's `embed`."""
    return {"kernel": ("embed", None), "bias": (None,)}


def init_head(cfg: ModelConfig, rng: jax.Array | None = None, std: float = 0.0) -> dict:
    """Score-head params: kernel ~ N(0, std^2) (zeros when `std` is 0), bias 0.

    A zero kernel makes every score 0 at the start (loss log 2, accuracy 1/2); the
    backbone receives gradient from the second step on.
    """
    shapes = head_shapes(cfg)
    kernel = jnp.zeros(shapes["kernel"].shape, shapes["kernel"].dtype)
    if std > 0:
        if rng is None:
            raise ValueError("init_head: std > 0 needs an rng")
        kernel = (std * jax.random.normal(rng, kernel.shape, jnp.float32)).astype(kernel.dtype)
    return {"kernel": kernel, "bias": jnp.zeros(shapes["bias"].shape, shapes["bias"].dtype)}


def rm_param_shapes(cfg: ModelConfig, gaze: GazeSpec | None = None) -> dict:
    """`jax.ShapeDtypeStruct` of every reward-model parameter (a gaze model's `"gaze"`
    entry included)."""
    out = {BACKBONE: param_shapes(cfg), HEAD: head_shapes(cfg)}
    if gaze is not None and gaze.enabled:
        out[GAZE] = gz.gaze_shapes(gaze, cfg)
    return out


def rm_param_logical_axes(cfg: ModelConfig, gaze: GazeSpec | None = None) -> dict:
    """Logical axis names of every reward-model parameter."""
    out = {BACKBONE: param_logical_axes(cfg), HEAD: head_logical_axes()}
    if gaze is not None and gaze.enabled:
        out[GAZE] = gz.gaze_logical_axes(gaze, cfg)
    return out


def rm_param_shardings(cfg: ModelConfig, mesh, rules=sh.DEFAULT_RULES,
                       gaze: GazeSpec | None = None) -> dict:
    """`NamedSharding` of every reward-model parameter on `mesh`."""
    return sh.logical_to_shardings(rm_param_logical_axes(cfg, gaze), rm_param_shapes(cfg, gaze),
                                   mesh, rules)


def gaze_spec_of(metadata: dict) -> GazeSpec:
    """The `GazeSpec` a reward-model checkpoint's metadata records (plain: mode "off")."""
    info = (metadata.get("reward_model") or {}).get("gaze") or {}
    if not info:
        return GazeSpec()
    return GazeSpec(mode=info["mode"], num_features=int(info["num_features"]),
                    width=int(info["width"]), dropout=tuple(info["dropout"]),
                    output_scale=float(info.get("output_scale", 1.0)))


# ------------------------------------------------------------------------------ scoring
def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """Index of the last non-padding position of each row, [B, T] -> int32 [B] (0 for an
    all-padding row)."""
    t = segment_ids.shape[-1]
    idx = jnp.where(segment_ids != 0, jnp.arange(t, dtype=jnp.int32), -1)
    return jnp.maximum(jnp.max(idx, axis=-1), 0).astype(jnp.int32)


def reward_scores(model_cfg: ModelConfig, params: dict, tokens: jax.Array,
                  segment_ids: jax.Array, positions: jax.Array | None = None,
                  rng: jax.Array | None = None, *, gaze: GazeSpec | None = None,
                  gaze_features: jax.Array | None = None) -> jax.Array:
    """Scalar score of each row: the head on the last real token's hidden state.

    Args:
        model_cfg: the backbone's config.
        params: `{"model": ..., "score": {"kernel", "bias"}}`.
        tokens: int32 [B, T], one sequence per row.
        segment_ids: int32 [B, T], non-zero on real tokens, 0 on padding.
        positions: int32 [B, T] RoPE positions; default 0..T-1, right for right padding
            (left-padded rows need positions counting from their first real token).
        rng: LoRA and gaze-projector dropout in training passes (None: deterministic).
        gaze: how the model uses gaze features (None or mode "off": it does not, and
            `gaze_features` is ignored).
        gaze_features: float [B, T, k], aligned with `tokens` (needed when gaze is on).

    Returns:
        float32 [B].
    """
    inputs_embeds = None
    if gaze is not None and gaze.enabled:
        if gaze_features is None:
            raise ValueError(f"this reward model uses gaze (mode {gaze.mode!r}) but got no "
                             "gaze_features")
        gaze_rng = None if rng is None else jax.random.fold_in(rng, 0x6A2E)
        tokens, segment_ids, positions, inputs_embeds = gz.gaze_inputs(
            gaze, model_cfg, params, tokens, segment_ids, positions, gaze_features, gaze_rng,
            backbone=BACKBONE)
    hidden = Transformer(model_cfg).apply(
        {"params": params[BACKBONE]}, tokens, positions=positions, segment_ids=segment_ids,
        return_hidden=True, rngs=dropout_rngs(model_cfg, rng), inputs_embeds=inputs_embeds)
    last = last_token_index(segment_ids)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    head = params[HEAD]
    return (h @ head["kernel"].astype(jnp.float32))[:, 0] + head["bias"].astype(jnp.float32)[0]


# --------------------------------------------------------------------------------- loss
def bradley_terry_loss(chosen: jax.Array, rejected: jax.Array, weights: jax.Array | None = None,
                       center_rewards_coefficient: float = 0.0):
    """The pairwise loss as a `(loss_sum, count, aux)` triple.

    Args:
        chosen: float [N] scores of the preferred responses.
        rejected: float [N] scores of the other responses.
        weights: float [N], 1 for real pairs and 0 for padding rows (default all 1).
        center_rewards_coefficient: weight of `(r_c + r_r)^2` per pair (0: off).

    Returns:
        `(sum_i w_i l_i, sum_i w_i, aux)` with `l_i = -log sigmoid(r_c - r_r)` (+ the
        centring term) and aux `(sum, weight)` pairs `accuracy` (ties count 1/2),
        `margin`, `reward_chosen`, `reward_rejected`.
    """
    chosen = chosen.astype(jnp.float32)
    rejected = rejected.astype(jnp.float32)
    w = jnp.ones_like(chosen) if weights is None else weights.astype(jnp.float32)
    margin = chosen - rejected
    per_pair = -jax.nn.log_sigmoid(margin)
    if center_rewards_coefficient:
        per_pair = per_pair + center_rewards_coefficient * jnp.square(chosen + rejected)
    correct = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))
    count = jnp.sum(w)
    aux = {"accuracy": (jnp.sum(correct * w), count),
           "margin": (jnp.sum(margin * w), count),
           "reward_chosen": (jnp.sum(chosen * w), count),
           "reward_rejected": (jnp.sum(rejected * w), count)}
    return jnp.sum(per_pair * w), count, aux


def make_reward_model_loss(model_cfg: ModelConfig, center_rewards_coefficient: float = 0.0,
                           gaze: GazeSpec | None = None):
    """`loss_fn(params, batch, rng) -> (loss_sum, pairs, aux)` for `train_step`.

    The batch holds `chosen_tokens`, `chosen_segment_ids`, `rejected_tokens`,
    `rejected_segment_ids` (int32 [B, T], right-padded) and optionally `pair_weight`
    (float32 [B], 0 on padding rows); a gaze model (`gaze` on) also `chosen_gaze`,
    `rejected_gaze` (float32 [B, T, k]). Chosen and rejected rows go through the model in
    one forward pass.
    """
    use_gaze = gaze is not None and gaze.enabled

    def loss_fn(params, batch, rng):
        b = batch["chosen_tokens"].shape[0]
        tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
        seg = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]],
                              axis=0)
        features = None
        if use_gaze:
            features = jnp.concatenate([batch["chosen_gaze"], batch["rejected_gaze"]], axis=0)
        scores = reward_scores(model_cfg, params, tokens, seg, rng=rng, gaze=gaze,
                               gaze_features=features)
        return bradley_terry_loss(scores[:b], scores[b:], batch.get("pair_weight"),
                                  center_rewards_coefficient)

    return loss_fn


# ------------------------------------------------------------------------- as a reward
def load_reward_model(workdir: str, step: int | None = None, mesh=None,
                      rules=sh.DEFAULT_RULES) -> tuple[ModelConfig, dict, dict]:
    """`(model_cfg, params, metadata)` of a reward-model checkpoint in `workdir`.

    Args:
        workdir: a workdir written by the `reward_model` trainer.
        step: checkpoint step (default: the latest).
        mesh: where to place the params (default: all of this process's devices, FSDP).
        rules: logical-axis rules.

    Raises:
        FileNotFoundError: no checkpoint (naming the folder).
        ValueError: the checkpoint is not a reward model's.
    """
    with open_run(workdir, step) as run:
        metadata = run.metadata()
        if "reward_model" not in metadata:
            trainer = metadata.get("config", {}).get("trainer", "?")
            raise ValueError(f"{run.directory} (step {run.step}) was written by trainer "
                             f"{trainer!r}, not by the 'reward_model' trainer; it has no score "
                             "head")
        model_cfg = model_config_from_metadata(metadata, where=str(run.directory))
        gaze = gaze_spec_of(metadata)
        if mesh is None:
            mesh = sh.make_mesh(sh.MeshConfig(), devices=jax.local_devices())
        params = run.restore_params(rm_param_shapes(model_cfg, gaze),
                                    rm_param_shardings(model_cfg, mesh, rules, gaze))
    # A LoRA reward model comes back merged: score with the plain config.
    return model_cfg.replace(lora_scale=0.0, lora_dropout=0.0), params, metadata


class RewardModelReward:
    """A trained reward model as a reward function (TRL convention).

    `reward(prompts, completions, **columns) -> list[float]`: the score of
    `prompt + completion + EOS` for each completion, computed in batches of `batch_size`
    rows of `max_length` tokens with one jitted function (one compilation). A completion
    whose `truncated` column is True (GRPO passes it) gets no EOS: it did not end.
    A GazeReward model (its metadata's `reward_model.gaze`) gets the gaze features of
    each `prompt + completion` from the predictor it was trained with (or `featurize`),
    computed here, at reward time.

    Args:
        workdir: the reward model's training workdir.
        step: checkpoint step (default: the latest).
        batch_size: sequences per scoring call.
        max_length: tokens per sequence (0: the training `data.seq_len`); longer
            sequences keep their last `max_length` tokens.
        tokenizer: tokenizer spec (default: the training `data.tokenizer`); it must be
            the one the reward model was trained with.
        add_eos: append EOS to finished completions.
        mesh: where to run (default: all of this process's devices).
        featurize: a gaze model's `text -> [tokens, k]` features (default: a
            `GazeFeaturizer` of the recorded `gaze.predictor`, `features` and `scale`).
    """

    def __init__(self, workdir: str, *, step: int | None = None, batch_size: int = 32,
                 max_length: int = 0, tokenizer: str = "", add_eos: bool = True, mesh=None,
                 featurize=None):
        from jaxpost.tokenizer import load_tokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mesh is None:
            mesh = sh.make_mesh(sh.MeshConfig(), devices=jax.local_devices())
        self.model_cfg, self.params, metadata = load_reward_model(workdir, step, mesh)
        data_cfg = metadata.get("config", {}).get("data", {})
        self.tokenizer = load_tokenizer(tokenizer or data_cfg.get("tokenizer", "byte"))
        self.max_length = int(max_length or data_cfg.get("seq_len") or 512)
        self.batch_size, self.add_eos, self.mesh, self.workdir = batch_size, add_eos, mesh, workdir
        self.__name__ = "reward_model"  # the name RewardSet logs for a callable
        self.gaze = gaze = gaze_spec_of(metadata)
        self.featurize = None
        if gaze.enabled:
            info = metadata["reward_model"]["gaze"]
            self.featurize = featurize or gz.featurizer_from_spec(
                self.tokenizer, info["predictor"], info["features"], info.get("scale", 1.0))
        cfg = self.model_cfg

        def score(params, tokens, segment_ids, features):
            with sh.logical_rules(mesh):
                return reward_scores(cfg, params, tokens, segment_ids, gaze=gaze,
                                     gaze_features=features)

        self._row_sharding = sh.batch_sharding(mesh, (batch_size, self.max_length))
        self._score = jax.jit(score)

    def __repr__(self) -> str:
        return f"RewardModelReward({self.workdir!r})"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **columns: Any) -> list[float]:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} completions")
        truncated = columns.get("truncated") or [False] * n
        if self.featurize is None:
            seqs = [encode_sequence(self.tokenizer, p, c, add_eos=self.add_eos and not t)
                    for p, c, t in zip(prompts, completions, truncated)]
            feats = None
        else:
            seqs, feats = zip(*(encode_sequence_features(self.tokenizer, p, c, self.featurize,
                                                         add_eos=self.add_eos and not t)
                                for p, c, t in zip(prompts, completions, truncated)))
        out: list[float] = []
        bs, k = self.batch_size, self.gaze.num_features
        for start in range(0, n, bs):
            chunk = seqs[start:start + bs]
            chunk = list(chunk) + [[]] * (bs - len(chunk))  # fixed shape: one compilation
            tokens, seg, _ = pad_sequences(chunk, self.max_length, self.tokenizer.pad_id)
            f = None
            if feats is not None:
                fchunk = list(feats[start:start + bs])
                fchunk += [np.zeros((0, k), np.float32)] * (bs - len(fchunk))
                f = jax.device_put(pad_features(fchunk, self.max_length, k),
                                   sh.batch_sharding(self.mesh, (bs, self.max_length, k)))
            scores = self._score(self.params, jax.device_put(tokens, self._row_sharding),
                                 jax.device_put(seg, self._row_sharding), f)
            out.extend(float(x) for x in np.asarray(jax.device_get(scores))[:min(bs, n - start)])
        return out


def from_workdir(workdir: str, step: int | None = None, batch_size: int = 32,
                 max_length: int = 0, tokenizer: str = "", add_eos: bool = True
                 ) -> RewardModelReward:
    """Reward-spec factory: `"jaxpost.rl.reward_model:from_workdir(workdir='/tmp/rm')"`,
    for plain and GazeReward models alike.

    See `RewardModelReward` for the arguments.
    """
    return RewardModelReward(workdir, step=step, batch_size=batch_size, max_length=max_length,
                             tokenizer=tokenizer, add_eos=add_eos)
