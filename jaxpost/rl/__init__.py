"""Reinforcement learning from rewards: GRPO maths (`grpo`), rollout rows and completion
log-probs (`rollout`) and reward functions (`rewards`).

`jaxpost.rl.grpo` is pure `jax.numpy` (advantages, the clipped per-token loss, loss
aggregation as `(sum, count)` pairs); `jaxpost.rl.rollout` lays sampled completions out
as rows and recomputes their log-probs with one forward pass; `jaxpost.rl.rewards` is
host-side Python (reward functions in the TRL convention, config specs, weighted
combination). Reward models (`jaxpost.rl.reward_model`), token credit (`jaxpost.rl.credit`)
and gaze (`jaxpost.rl.gaze`) are imported on their own.
"""

from jaxpost.rl.grpo import (
    LOSS_TYPES,
    aggregate,
    group_advantages,
    masked_mean_pair,
    normalize_credit,
    per_token_loss,
    policy_loss,
    register_loss_type,
    token_advantages,
    token_entropy,
)
from jaxpost.rl.rewards import (
    RewardFunctionError,
    RewardSet,
    RewardSpecError,
    exact_answer,
    format_reward,
    resolve_reward,
    reward_metrics,
    soft_overlong_penalty,
)
from jaxpost.rl.rollout import build_rows, completion_logits, completion_logprobs

__all__ = [
    "LOSS_TYPES", "aggregate", "group_advantages", "masked_mean_pair", "normalize_credit",
    "per_token_loss", "policy_loss", "register_loss_type", "token_advantages",
    "token_entropy", "build_rows", "completion_logits", "completion_logprobs",
    "RewardFunctionError", "RewardSet", "RewardSpecError", "exact_answer",
    "format_reward", "resolve_reward", "reward_metrics", "soft_overlong_penalty",
]
