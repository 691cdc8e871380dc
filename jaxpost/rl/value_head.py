"""PPO's critic: a scalar value head on the policy's own trunk, or a separate critic model.

Both go through the one `jaxpost.models.Transformer` forward; the head is the reward
model's scalar head (`jaxpost.rl.reward_model.head_shapes` / `init_head`), applied to the
final normed hidden state of *every* position instead of the last one. Two params layouts
(`VALUE_MODELS`):

- `"shared"`: `{"model": policy, "score": head}`, the reward model's layout. One pass
  (`Transformer(..., with_hidden=True)`) gives the logits and the values; the value loss
  trains the head and the trunk (not `lm_head`). The policy's freeze rules and LoRA treat
  `model.*` as usual; the head (`score.weight`, `score.bias`) trains unless a `freeze`
  pattern names it, so a LoRA policy keeps a full value head.
- `"separate"`: `{"model": policy, "critic": {"model": critic trunk, "score": head}}`, a
  critic of the policy's architecture (TRL's PPO value model) started from the policy's
  starting params. Two passes; the value loss trains only the critic, the policy loss
  only the policy. HF names of the critic carry a `critic.` prefix
  (`critic.model.layers.0.mlp.up_proj.weight`), so `^model\\.` rules pick the policy only.

The value of completion token t is read at the position that predicts it (column
`P - 1 + t` of a rollout row, `jaxpost.rl.rollout`), as TRL's `PPOTrainer` slices
`full_value[:, context_length - 1:-1]`: V(s_t) is the value of the state before token t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost import sharding as sh
from jaxpost.models import (
    ModelConfig,
    Transformer,
    param_logical_axes,
    param_shapes,
    token_logprobs,
)
from jaxpost.models.layers import dropout_rngs
from jaxpost.rl import reward_model as rm

POLICY = rm.BACKBONE  # params key of the policy transformer ("model")
HEAD = rm.HEAD  # params key of the value head ("score", as HF's value models name it)
CRITIC = "critic"  # params key of a separate critic {"model", "score"}
#: `value_model` values: the head on the policy's trunk, or on a critic of its own.
VALUE_MODELS = ("shared", "separate")

__all__ = ["CRITIC", "HEAD", "POLICY", "VALUE_MODELS", "check_value_model", "completion_outputs",
           "init_value_params", "logits_and_values", "policy_params", "value_model_of",
           "value_param_logical_axes", "value_param_shapes", "value_param_shardings"]


def check_value_model(value_model: str) -> None:
    """Raises ValueError naming `value_model` unless it is one of `VALUE_MODELS`."""
    if value_model not in VALUE_MODELS:
        raise ValueError(f"value_model={value_model!r}; expected one of {VALUE_MODELS}")


def value_param_shapes(cfg: ModelConfig, value_model: str = "shared") -> dict:
    """`jax.ShapeDtypeStruct` of every parameter of a policy with its value head."""
    check_value_model(value_model)
    if value_model == "shared":
        return {POLICY: param_shapes(cfg), HEAD: rm.head_shapes(cfg)}
    return {POLICY: param_shapes(cfg), CRITIC: rm.rm_param_shapes(cfg)}


def value_param_logical_axes(cfg: ModelConfig, value_model: str = "shared") -> dict:
    """Logical axis names, shaped like `value_param_shapes`."""
    check_value_model(value_model)
    if value_model == "shared":
        return {POLICY: param_logical_axes(cfg), HEAD: rm.head_logical_axes()}
    return {POLICY: param_logical_axes(cfg), CRITIC: rm.rm_param_logical_axes(cfg)}


def value_param_shardings(cfg: ModelConfig, mesh, value_model: str = "shared",
                          rules=sh.DEFAULT_RULES) -> dict:
    """`NamedSharding` of every parameter on `mesh` (the critic shards like the policy)."""
    return sh.logical_to_shardings(value_param_logical_axes(cfg, value_model),
                                   value_param_shapes(cfg, value_model), mesh, rules)


def value_model_of(params: dict) -> str:
    """`"shared"` or `"separate"`, read off a params tree's layout."""
    if CRITIC in params:
        return "separate"
    if HEAD in params:
        return "shared"
    raise ValueError(f"params with top-level keys {sorted(params)} have no value head "
                     f"({HEAD!r}) and no critic ({CRITIC!r})")


def init_value_params(cfg: ModelConfig, policy: dict, value_model: str = "shared",
                      rng: jax.Array | None = None, std: float = 0.0) -> dict:
    """The policy's params with a fresh value head (`rm.init_head`: kernel N(0, std^2),
    zeros when `std` is 0, so every value starts at 0); `"separate"` also gives the critic
    a copy of the policy's params as its trunk (a copy, not an alias: the train state is
    donated)."""
    check_value_model(value_model)
    head = rm.init_head(cfg, rng, std)
    if value_model == "shared":
        return {POLICY: policy, HEAD: head}
    return {POLICY: policy, CRITIC: {rm.BACKBONE: jax.tree.map(jnp.copy, policy), rm.HEAD: head}}


def policy_params(params: dict) -> dict:
    """The policy transformer's params (what the sampler and the reference use)."""
    return params[POLICY]


def _values(hidden: jax.Array, head: dict) -> jax.Array:
    h = hidden.astype(jnp.float32)
    return (h @ head["kernel"].astype(jnp.float32))[..., 0] + head["bias"].astype(jnp.float32)[0]


def logits_and_values(cfg: ModelConfig, params: dict, tokens: jax.Array,
                      positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                      rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """float32 logits `[B, T, V]` of the policy and values `[B, T]` at every position.

    Shared trunk: one forward pass (`with_hidden=True`). Separate critic: the policy's
    pass for the logits and the critic's (`return_hidden=True`) for the values. `rng`
    drives LoRA dropout in training passes (None: deterministic).
    """
    model = Transformer(cfg)
    kw = {"positions": positions, "segment_ids": segment_ids}
    if value_model_of(params) == "shared":
        logits, hidden = model.apply({"params": params[POLICY]}, tokens, with_hidden=True,
                                     rngs=dropout_rngs(cfg, rng), **kw)
        return logits.astype(jnp.float32), _values(hidden, params[HEAD])
    critic_rng = None if rng is None else jax.random.fold_in(rng, 1)
    logits = model.apply({"params": params[POLICY]}, tokens, rngs=dropout_rngs(cfg, rng), **kw)
    hidden = model.apply({"params": params[CRITIC][rm.BACKBONE]}, tokens, return_hidden=True,
                         rngs=dropout_rngs(cfg, critic_rng), **kw)
    return logits.astype(jnp.float32), _values(hidden, params[CRITIC][rm.HEAD])


def completion_outputs(cfg: ModelConfig, params: dict, rows: dict, prompt_len: int,
                       completion_len: int, temperature: float, rng: jax.Array | None = None,
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(logp [N, C], logits [N, C, V], values [N, C])` of the completion tokens of
    rollout `rows` (`tokens`, `positions`, `segment_ids` as `jaxpost.rl.rollout.build_rows`
    lays them out): log-probs under `log_softmax(logits / temperature)` as
    `jaxpost.rl.rollout.completion_logprobs` computes them, and V(s_t) at the position that
    predicts token t."""
    logits, values = logits_and_values(cfg, params, rows["tokens"], rows["positions"],
                                       rows["segment_ids"], rng)
    p, c = prompt_len, completion_len
    logits = logits[:, p - 1:p + c - 1] / temperature
    logp = token_logprobs(logits, rows["tokens"][:, p:])
    return logp, logits, values[:, p - 1:p + c - 1]
