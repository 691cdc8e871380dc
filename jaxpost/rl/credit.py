"""Token credit: the one interface through which per-token weights enter GRPO.

A token-credit function is named in a GRPO recipe as `token_credit` (like a reward
function: `"package.module:function"` or `"package.module:factory(key=value)"`) and is
called on the host, once per rollout batch, with keyword arguments only:

    fn(*, prompts: list[str], completions: list[str], completion_ids: np.ndarray [N, T],
       mask: np.ndarray [N, T], tokenizer, logprobs: np.ndarray [N, T], **columns)
       -> array-like [N, T] of non-negative weights

- `completion_ids` are the sampled token ids (padding after each completion), `mask` is 1
  on the completion tokens that enter the loss, `tokenizer` the policy's tokenizer,
  `logprobs` the sampling policy's log-probs of the sampled tokens (nats), and `columns`
  the dataset's other fields plus `completion_lengths` and `truncated`, as reward
  functions get them (accept `**columns` and ignore what you do not use).
- Only the *shape* of each row's weights matters: `jaxpost.rl.grpo.token_advantages`
  normalises them (a row whose valid weights sum to 0 falls back to uniform) and turns
  them into advantages by `token_credit_mode`:
  `"weighted"` (the sequence advantage times the weights rescaled to masked mean 1) or
  `"reward_to_go"` (the sequence advantage spread by the weights rescaled to sum 1, then
  summed from each token to the end). See `token_advantages` for the formulas.

Gaze weighting (`jaxpost.rl.gaze:gaze_credit(...)`) is one such function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from jaxpost.rl.rewards import resolve_reward

#: Keyword arguments the credit function receives besides the dataset columns.
CREDIT_ARGUMENTS = ("prompts", "completions", "completion_ids", "mask", "tokenizer", "logprobs")


class TokenCreditFn(Protocol):
    """`fn(*, prompts, completions, completion_ids, mask, tokenizer, logprobs, **columns)
    -> [N, T]` non-negative weights (see the module docstring)."""

    def __call__(self, *, prompts: list[str], completions: list[str],
                 completion_ids: np.ndarray, mask: np.ndarray, tokenizer: Any,
                 logprobs: np.ndarray, **columns: Any) -> np.ndarray: ...


class TokenCreditError(ValueError):
    """A token-credit function returned something unusable (names the function)."""


def resolve_token_credit(spec) -> tuple[str, TokenCreditFn]:
    """`(name, fn)` of a token-credit spec (same syntax and errors as reward specs)."""
    return resolve_reward(spec)


def token_credit_weights(fn: TokenCreditFn, name: str, *, prompts: Sequence[str],
                         completions: Sequence[str], completion_ids: np.ndarray,
                         mask: np.ndarray, tokenizer: Any, logprobs: np.ndarray,
                         columns: Mapping[str, Sequence[Any]]) -> np.ndarray:
    """Calls `fn` and checks its result: float32 `[N, T]`, finite, >= 0 (0 on padding).

    Raises:
        TokenCreditError: naming `name`, on a column that shadows an argument, a wrong
            shape, or non-finite or negative weights on valid tokens.
    """
    clash = sorted(set(columns) & set(CREDIT_ARGUMENTS))
    if clash:
        raise TokenCreditError(f"token_credit {name}: dataset columns {clash} have the names "
                               f"of credit arguments {CREDIT_ARGUMENTS}; rename them")
    mask = np.asarray(mask, np.float32)
    out = fn(prompts=list(prompts), completions=list(completions),
             completion_ids=np.asarray(completion_ids), mask=mask, tokenizer=tokenizer,
             logprobs=np.asarray(logprobs, np.float32), **dict(columns))
    w = np.asarray(out, np.float32)
    if w.shape != mask.shape:
        raise TokenCreditError(f"token_credit {name} returned shape {w.shape}; expected the "
                               f"[N, T] completion shape {mask.shape}")
    valid = mask > 0
    if not np.all(np.isfinite(w[valid])):
        raise TokenCreditError(f"token_credit {name} returned non-finite weights on valid "
                               "tokens")
    if np.any(w[valid] < 0):
        raise TokenCreditError(f"token_credit {name} returned negative weights (min "
                               f"{float(w[valid].min()):.4g}); weights must be >= 0")
    return np.where(valid, w, 0.0).astype(np.float32)


__all__ = ["CREDIT_ARGUMENTS", "TokenCreditError", "TokenCreditFn", "resolve_token_credit",
           "token_credit_weights"]
