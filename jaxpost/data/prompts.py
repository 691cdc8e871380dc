"""Prompts for generation: eval by sampling, and GRPO rollouts.

`render_prompt(tokenizer, record)` turns a record into the text a model continues:

* `{"messages": [...]}`: the conversation up to (not including) a final assistant
  message, rendered with the chat template and the generation prompt;
* `{"prompt": [...messages]}`: the same for a message-list prompt;
* `{"prompt": str}`: the string as is (or wrapped as one user turn with
  `chat=True`).

`make_prompt_iterator` streams batches of such prompts with the same shuffling, sharding
and checkpointable state as the SFT pipeline; each element keeps the record's other fields
(e.g. `answer`), which reward functions receive as columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jaxpost.data.pipeline import _jsonable, record_dataset
from jaxpost.tokenizer import Tokenizer

PROMPT_STATE_FORMAT = "jaxpost.data.prompt_iterator/1"


def prompt_messages(record: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The chat messages of a record's prompt (None for a plain-text prompt)."""
    if "messages" in record:
        msgs = list(record["messages"])
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return msgs
    p = record.get("prompt")
    if isinstance(p, list):
        return list(p)
    if isinstance(p, str):
        return None
    raise ValueError(f"record has keys {sorted(record)}; a prompt record needs 'prompt' "
                     "(string or messages) or 'messages'")


def render_prompt(tokenizer: Tokenizer, record: Mapping[str, Any], *, chat: bool = False,
                  **template_kwargs: Any) -> str:
    """The text a model continues for this record (see module docstring).

    Args:
        tokenizer: tokenizer (its chat template is used for chat prompts).
        record: the record.
        chat: wrap a plain-text `prompt` as one user message of the chat template.
        **template_kwargs: extra chat-template variables.

    Returns:
        The prompt text; `tokenizer.encode(text)` gives the ids to prefill (prepend BOS
        for plain-text prompts if `tokenizer.add_bos`; chat templates write their own).
    """
    msgs = prompt_messages(record)
    if msgs is None:
        if not chat:
            return record["prompt"]
        msgs = [{"role": "user", "content": record["prompt"]}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, **template_kwargs)


def encode_prompt(tokenizer: Tokenizer, text: str, *, templated: bool) -> list[int]:
    """Prompt ids: BOS is added for plain text when the tokenizer adds it by default."""
    ids = tokenizer.encode(text)
    if not templated and tokenizer.add_bos and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    return ids


class _PromptMapper:
    def __init__(self, tokenizer: Tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        templated = self.chat or prompt_messages(record) is not None
        text = render_prompt(self.tokenizer, record, chat=self.chat)
        out = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
        if "messages" in record and record["messages"][-1]["role"] == "assistant":
            out.setdefault("reference", record["messages"][-1]["content"])
        out["prompt"] = text
        out["prompt_ids"] = encode_prompt(self.tokenizer, text, templated=templated)
        return out


def _as_list(elements: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(elements)


class PromptBatchIterator:
    """Batches (lists) of prompt dicts with a JSON-serialisable, resumable state.

    Each element: `prompt` (text), `prompt_ids` (list[int]), and the record's other
    fields (a final assistant message becomes `reference`).
    """

    def __init__(self, source: Any, tokenizer: Tokenizer, *, batch_size: int, seed: int,
                 shuffle: bool, num_epochs: int | None, shard_index: int | None,
                 shard_count: int | None, chat: bool, num_threads: int = 1,
                 prefetch_buffer_size: int = 16, shard_block: int = 1):
        import grain

        ds = record_dataset(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                            shard_index=shard_index, shard_count=shard_count,
                            shard_block=shard_block)
        ds = ds.map(_PromptMapper(tokenizer, chat)).to_iter_dataset(grain.ReadOptions(
            num_threads=num_threads,
            prefetch_buffer_size=prefetch_buffer_size if num_threads else 0))
        self._it = iter(ds.batch(batch_size, drop_remainder=True, batch_fn=_as_list))

    def __iter__(self) -> PromptBatchIterator:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """The position in the stream, as a JSON-serialisable dict."""
        return {"format": PROMPT_STATE_FORMAT, "grain": _jsonable(self._it.get_state())}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a position saved by `get_state`."""
        if state.get("format") != PROMPT_STATE_FORMAT:
            raise ValueError(f"not a prompt iterator state (format {state.get('format')!r})")
        self._it.set_state(state["grain"])


def make_prompt_iterator(
    source: Any,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    chat: bool = False,
    num_threads: int = 1,
    prefetch_buffer_size: int = 16,
    shard_block: int = 1,
) -> PromptBatchIterator:
    """Streams batches of prompts (for GRPO rollouts or sampling-based eval).

    Args:
        source: random-access source of prompt records.
        tokenizer: the tokenizer.
        batch_size: prompts per batch on this process.
        seed: shuffle seed.
        shuffle: shuffle globally, differently each epoch.
        num_epochs: passes over the data; None repeats forever.
        shard_index: this process's shard (default `jax.process_index()`).
        shard_count: number of shards (default `jax.process_count()`).
        chat: wrap plain-text prompts as a user turn of the chat template.
        num_threads: reader threads rendering ahead (0: synchronous).
        prefetch_buffer_size: prompts rendered ahead.
        shard_block: processes take turns in blocks of this many records (1: strided);
            `batch_size` makes each global batch the processes' blocks in process order.

    Returns:
        `PromptBatchIterator` yielding lists of `batch_size` prompt dicts.
    """
    return PromptBatchIterator(source, tokenizer, batch_size=batch_size, seed=seed,
                               shuffle=shuffle, num_epochs=num_epochs,
                               shard_index=shard_index, shard_count=shard_count, chat=chat,
                               num_threads=num_threads,
                               prefetch_buffer_size=prefetch_buffer_size,
                               shard_block=shard_block)
