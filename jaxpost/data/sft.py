"""SFT examples: token ids plus a loss mask that marks which tokens are targets.

An example is `{"tokens": int32[L], "loss_mask": float32[L]}`: `loss_mask[t] == 1.0`
when `tokens[t]` is to be predicted from position `t - 1` (the batch convention of
`jaxpost.data`); `loss_mask[0]` is always 0.

* Prompt/completion records (`{"prompt": str, "completion": str}`): the prompt and the
  completion are tokenized separately (as at inference, where generation continues the
  tokenized prompt) and concatenated; only completion tokens (and the EOS after them) are
  targets. BOS is prepended when the tokenizer does so by default (`add_bos=None`).
* Chat records (`{"messages": [...]}`, or `prompt`/`completion` given as message lists):
  the conversation is rendered with the tokenizer's chat template and tokenized as a
  whole; only tokens of assistant turns are targets. Assistant spans are found by
  rendering prefixes of the conversation: turn `i` spans from the end of
  `render(messages[:i], add_generation_prompt=True)` to the end of
  `render(messages[:i+1])` (trailing whitespace excluded), so the header of the turn is
  context and the end-of-turn token is a target. When the template marks assistant output
  with `{% generation %}` ... `{% endgeneration %}` (TRL's `*_training.jinja` templates),
  the mask is instead exactly the marked tokens, as `transformers`'
  `return_assistant_tokens_mask` computes it (`tokenize_chat_marked`). Templates that are not prefix-stable
  (e.g. ones that rewrite earlier turns) fall back to locating the assistant's content
  in the rendered text. Tokens are mapped to spans through their character offsets.

Sequences longer than `max_len` are handled by a truncation policy (`truncate_right`,
`truncate_left` keeping the end, or `drop`); examples left with no target token are
dropped. `ExampleStats` counts every outcome.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxpost.tokenizer import ChatTemplateError, Tokenizer, has_generation_markers

Example = dict[str, np.ndarray]

TRUNCATION_POLICIES = ("truncate_right", "truncate_left", "drop")

# Outcomes of `SFTExampleBuilder`, counted by `ExampleStats`.
KEPT = "kept"  # fits in max_len as is
TRUNCATED = "truncated"  # was longer than max_len, cut by the policy and kept
DROPPED_TOO_LONG = "dropped_too_long"  # was longer than max_len and the policy is "drop"
DROPPED_NO_TARGETS = "dropped_no_targets"  # no target token left (e.g. prompt filled it)
STATUSES = (KEPT, TRUNCATED, DROPPED_TOO_LONG, DROPPED_NO_TARGETS)


@dataclasses.dataclass
class ExampleStats:
    """Counts of example outcomes (how many were kept, truncated, dropped and why)."""

    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_targets: int = 0

    def add(self, status: str) -> None:
        """Counts one example with outcome `status` (one of `STATUSES`)."""
        if status not in STATUSES:
            raise ValueError(f"unknown example status {status!r}; expected one of {STATUSES}")
        setattr(self, status, getattr(self, status) + 1)

    @property
    def seen(self) -> int:
        """Examples seen in total."""
        return self.kept + self.truncated + self.dropped_too_long + self.dropped_no_targets

    def to_dict(self) -> dict[str, int]:
        """The counts as a JSON-serialisable dict."""
        return {s: getattr(self, s) for s in STATUSES}

    def load(self, counts: Mapping[str, int]) -> None:
        """Sets the counts from `to_dict()` output (used when an iterator is restored)."""
        for s in STATUSES:
            setattr(self, s, int(counts.get(s, 0)))


def _example(ids: Sequence[int], mask: Sequence[float]) -> Example:
    tokens = np.asarray(ids, np.int32)
    loss_mask = np.asarray(mask, np.float32)
    if len(loss_mask):
        loss_mask[0] = 0.0  # the first token of a segment is never predicted
    return {"tokens": tokens, "loss_mask": loss_mask}


# --------------------------------------------------------------------------- prompt/completion


def tokenize_prompt_completion(
    tokenizer: Tokenizer,
    prompt: str,
    completion: str,
    *,
    add_bos: bool | None = None,
    add_eos: bool | None = None,
) -> Example:
    """Tokenizes a prompt/completion pair with a completion-only loss mask.

    Args:
        tokenizer: the tokenizer.
        prompt: context text (never a target).
        completion: text to learn (every token a target).
        add_bos: prepend BOS; None: the tokenizer's default (`tokenizer.add_bos`).
        add_eos: append EOS after the completion, as a target; None means True.

    Returns:
        `{"tokens", "loss_mask"}`, untruncated.
    """
    if add_bos is None:
        add_bos = tokenizer.add_bos
    if add_eos is None:
        add_eos = True
    head: list[int] = []
    if add_bos:
        if tokenizer.bos_id is None:
            raise ValueError(f"add_bos=True but {tokenizer!r} has no BOS token")
        head.append(tokenizer.bos_id)
    p = head + tokenizer.encode(prompt)
    c = tokenizer.encode(completion)
    if add_eos:
        if tokenizer.eos_id is None:
            raise ValueError(f"add_eos=True but {tokenizer!r} has no EOS token")
        c.append(tokenizer.eos_id)
    return _example(p + c, [0.0] * len(p) + [1.0] * len(c))


# --------------------------------------------------------------------------- chat


def _render(tokenizer: Tokenizer, messages, gen: bool, kwargs) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=gen, **kwargs)


def assistant_spans(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    **template_kwargs: Any,
) -> tuple[str, list[tuple[int, int]]]:
    """Renders a conversation and finds the character span of each assistant turn.

    Args:
        tokenizer: tokenizer with a chat template.
        messages: the conversation.
        **template_kwargs: extra template variables.

    Returns:
        `(text, spans)`: the rendered conversation and, per assistant message in order,
        `(start, end)` character offsets into `text` covering its content and whatever
        the template writes to close the turn (e.g. EOS), trailing whitespace excluded.

    Raises:
        ChatTemplateError: if an assistant turn cannot be located in the rendering.
    """
    full = _render(tokenizer, messages, False, template_kwargs)
    spans: list[tuple[int, int]] = []
    cursor = 0  # everything before it belongs to earlier messages
    for i, m in enumerate(messages):
        content = m["content"] if isinstance(m.get("content"), str) else ""
        if m["role"] != "assistant":
            k = full.find(content, cursor) if content else -1
            if k >= 0:
                cursor = k + len(content)
            continue
        try:
            before = _render(tokenizer, messages[:i], True, template_kwargs)
            through = _render(tokenizer, messages[: i + 1], False, template_kwargs)
        except (ChatTemplateError, LookupError, TypeError):  # e.g. a template that
            before = through = None  # reads messages[0] cannot render an empty prefix
        if (before is not None and through is not None and len(through) > len(before)
                and full.startswith(through) and through.startswith(before)
                and len(before) >= cursor):
            start, end = len(before), len(through)
        else:  # template rewrites earlier turns: locate the content itself
            start = full.find(content, cursor) if content else -1
            if start < 0:
                raise ChatTemplateError(
                    f"cannot locate assistant message {i} in the rendered conversation: the "
                    "template is not prefix-stable and the message content does not appear "
                    "verbatim; use prompt/completion records for this template")
            end = start + len(content)
            eos = tokenizer.eos_token
            if eos and full.startswith(eos, end):
                end += len(eos)
        cursor = end
        while end > start and full[end - 1].isspace():
            end -= 1
        spans.append((start, end))
    return full, spans


def tokenize_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_eos: bool | None = None,
    **template_kwargs: Any,
) -> Example:
    """Tokenizes a conversation through the chat template with an assistant-only mask.

    Args:
        tokenizer: tokenizer with a chat template.
        messages: the conversation (`role`/`content` dicts).
        add_eos: add EOS (as a target) right after the final assistant reply. None
            (default): the template governs, and EOS is added only when the conversation
            ends with an assistant turn whose span holds no EOS token (a template without
            end-of-turn markers). True/False force it.
        **template_kwargs: extra template variables.

    Returns:
        `{"tokens", "loss_mask"}`, untruncated.
    """
    if has_generation_markers(tokenizer.chat_template):
        return tokenize_chat_marked(tokenizer, messages, add_eos=add_eos, **template_kwargs)
    text, spans = assistant_spans(tokenizer, messages, **template_kwargs)
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = np.zeros(len(ids), np.float32)
    starts = np.asarray([o[0] for o in offsets], np.int64)
    last_span: np.ndarray = np.zeros(0, np.int64)
    for k, (a, b) in enumerate(spans):
        inside = (starts >= a) & (starts < b)
        mask[inside] = 1.0
        if k == len(spans) - 1:
            last_span = np.nonzero(inside)[0]
    ids = list(ids)
    ends_with_assistant = bool(messages) and messages[-1]["role"] == "assistant"
    if add_eos is None:
        add_eos = ends_with_assistant and tokenizer.eos_id not in [ids[j] for j in last_span]
    if add_eos:
        if tokenizer.eos_id is None:
            raise ValueError(f"add_eos=True but {tokenizer!r} has no EOS token")
        # right after the reply (before any trailing newline the template writes), as a
        # model generating this reply would emit it
        at = int(last_span[-1]) + 1 if ends_with_assistant and len(last_span) else len(ids)
        ids.insert(at, tokenizer.eos_id)
        mask = np.insert(mask, at, np.float32(1.0))
    return _example(ids, mask)


def _char_to_token(offsets: Sequence[tuple[int, int]], starts: Sequence[int],
                   char: int) -> int | None:
    """The first token whose character span holds `char` (tokenizers' `char_to_token`;
    several byte-level tokens can share one character); `starts` are the offsets'
    starts, non-decreasing."""
    k = bisect.bisect_right(starts, char) - 1
    while k >= 0 and not offsets[k][0] <= char < offsets[k][1]:
        if offsets[k][0] < offsets[k][1]:
            return None  # a non-empty token ends at or before `char`: none holds it
        k -= 1  # an empty span (e.g. an added token with no text) holds nothing
    if k < 0:
        return None
    while k > 0 and offsets[k - 1][0] <= char < offsets[k - 1][1]:
        k -= 1
    return k


def generation_mask(offsets: Sequence[tuple[int, int]],
                    spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """The token mask of `{% generation %}` character spans, exactly as transformers'
    `return_assistant_tokens_mask`: for each span, every token from the one holding its
    first character through the one holding its last (to the end when that character is
    in no token); a span whose first character is in no token stops the scan."""
    mask = np.zeros(len(offsets), np.float32)
    starts = [o[0] for o in offsets]
    for a, b in spans:
        start = _char_to_token(offsets, starts, a)
        end = _char_to_token(offsets, starts, b - 1)
        if start is None:
            break
        mask[start:(end + 1 if end else len(offsets))] = 1.0
    return mask


def tokenize_chat_marked(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_eos: bool | None = None,
    **template_kwargs: Any,
) -> Example:
    """Tokenizes a conversation whose chat template marks assistant output with
    `{% generation %}` ... `{% endgeneration %}`: the loss mask is exactly the marked
    tokens (what `transformers`' `return_assistant_tokens_mask` and TRL's
    `assistant_only_loss` train on, newlines and end-of-turn tokens inside the block
    included). The template governs EOS: `add_eos=None` (default) or False adds none;
    True appends EOS, as a target, after the last marked token.
    """
    text, spans = tokenizer.apply_chat_template_with_spans(messages, **template_kwargs)
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = generation_mask(offsets, spans)
    ids = list(ids)
    if add_eos:
        if tokenizer.eos_id is None:
            raise ValueError(f"add_eos=True but {tokenizer!r} has no EOS token")
        marked = np.nonzero(mask)[0]
        at = int(marked[-1]) + 1 if len(marked) else len(ids)
        ids.insert(at, tokenizer.eos_id)
        mask = np.insert(mask, at, np.float32(1.0))
    return _example(ids, mask)


# --------------------------------------------------------------------------- records


def tokenize_record(
    tokenizer: Tokenizer,
    record: Mapping[str, Any],
    *,
    add_bos: bool | None = None,
    add_eos: bool | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> Example:
    """Tokenizes one SFT record (prompt/completion or chat), untruncated.

    Args:
        tokenizer: the tokenizer.
        record: `{"prompt": str, "completion": str}`, `{"messages": [...]}`, or
            `{"prompt": [...messages], "completion": [...messages]}`.
        add_bos: see `tokenize_prompt_completion` (ignored for chat: the template
            writes BOS itself if the model wants one).
        add_eos: see `tokenize_prompt_completion` / `tokenize_chat`.
        template_kwargs: extra chat-template variables.

    Returns:
        `{"tokens", "loss_mask"}`.
    """
    kwargs = dict(template_kwargs or {})
    if "messages" in record:
        return tokenize_chat(tokenizer, record["messages"], add_eos=add_eos, **kwargs)
    if "prompt" in record and "completion" in record:
        p, c = record["prompt"], record["completion"]
        if isinstance(p, str) and isinstance(c, str):
            return tokenize_prompt_completion(tokenizer, p, c, add_bos=add_bos, add_eos=add_eos)
        if isinstance(p, list) and isinstance(c, list):
            return tokenize_chat(tokenizer, list(p) + list(c), add_eos=add_eos, **kwargs)
        raise ValueError(
            "'prompt' and 'completion' must both be strings or both be message lists, got "
            f"{type(p).__name__} and {type(c).__name__}")
    raise ValueError(
        f"SFT record has keys {sorted(record)}; expected 'prompt' and 'completion', or "
        "'messages'")


def truncate(example: Example, max_len: int, policy: str) -> tuple[Example | None, str]:
    """Applies a truncation policy to an example.

    Args:
        example: `{"tokens", "loss_mask"}`.
        max_len: the longest allowed length.
        policy: "truncate_right" (keep the first max_len tokens), "truncate_left" (keep
            the last max_len tokens; the new first token stops being a target), or "drop".

    Returns:
        `(example or None, status)`, status one of `STATUSES`; None when dropped (too long
        under "drop", or no target token left).
    """
    if policy not in TRUNCATION_POLICIES:
        raise ValueError(f"unknown truncation policy {policy!r}; expected one of "
                         f"{TRUNCATION_POLICIES}")
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (one context and one target), got "
                         f"{max_len}")
    n = len(example["tokens"])
    status = KEPT
    if n > max_len:
        if policy == "drop":
            return None, DROPPED_TOO_LONG
        sl = slice(0, max_len) if policy == "truncate_right" else slice(n - max_len, n)
        example = _example(example["tokens"][sl], example["loss_mask"][sl].copy())
        status = TRUNCATED
    if not example["loss_mask"].any():
        return None, DROPPED_NO_TARGETS
    return example, status


class SFTExampleBuilder:
    """record -> example with truncation, as one picklable callable for grain `map`.

    Args:
        tokenizer: the tokenizer.
        max_len: the longest example (normally the row length T of the batches).
        truncation: "truncate_right", "truncate_left" or "drop".
        add_bos: see `tokenize_record`.
        add_eos: see `tokenize_record`.
        template_kwargs: extra chat-template variables.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_len: int,
        *,
        truncation: str = "truncate_right",
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ):
        if truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"unknown truncation policy {truncation!r}; expected one of "
                             f"{TRUNCATION_POLICIES}")
        self.tokenizer = tokenizer
        self.max_len = int(max_len)
        self.truncation = truncation
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.template_kwargs = dict(template_kwargs or {})

    def build(self, record: Mapping[str, Any]) -> tuple[Example | None, str]:
        """`(example or None, status)` for one record."""
        ex = tokenize_record(self.tokenizer, record, add_bos=self.add_bos,
                             add_eos=self.add_eos, template_kwargs=self.template_kwargs)
        return truncate(ex, self.max_len, self.truncation)

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """For grain: `{"tokens", "loss_mask", "status"}` (empty arrays when dropped)."""
        ex, status = self.build(record)
        if ex is None:
            ex = _example([], [])
        return {**ex, "status": status}
