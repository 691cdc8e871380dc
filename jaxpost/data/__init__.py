"""Host-side data: sources, SFT examples, packing, the grain pipeline, preference pairs,
synthetic tasks.

Batch convention (what the trainers consume): a dict of numpy arrays, all `[B, T]`:

    tokens       int32    token ids (`tokenizer.pad_id` in padding)
    positions    int32    RoPE positions, restarting at 0 for each packed example
    segment_ids  int32    0 = padding, 1..k = the k-th example packed into the row;
                          attention never crosses segments
    loss_mask    float32  1.0 where tokens[b, t] is a target predicted from position t-1 of
                          the same segment; the first token of every segment has 0

The SFT loss is: logits[:, :-1] predict tokens[:, 1:], weighted by loss_mask[:, 1:].

Typical use:

    from jaxpost import data
    from jaxpost.tokenizer import load_tokenizer

    tok = load_tokenizer("byte")
    src = data.open_source("synthetic:addition")   # or "data/*.jsonl", "tfds:NAME", ...
    it = data.make_sft_iterator(src, tok, seq_len=64, batch_size=16, seed=0)
    batch = next(it); state = it.get_state(); ...; it.set_state(state)
    prompts = data.synthetic.addition_prompts(tok, 100)   # eval: prompt, prompt_ids, answer
"""

from jaxpost.data import facts, packing, preference, prompts, sft, sources, synthetic
from jaxpost.data.packing import check_batch, pack_examples, pad_examples, unpack_batch
from jaxpost.data.pipeline import (
    SFTBatchIterator,
    SFTDataOptions,
    TooManyDroppedError,
    make_sft_dataset,
    make_sft_iterator,
    record_dataset,
)
from jaxpost.data.preference import (
    PreferenceBatches,
    check_preference_source,
    encode_pair,
    open_preference_source,
    pair_batch,
    preference_problem,
)
from jaxpost.data.prompts import make_prompt_iterator, render_prompt
from jaxpost.data.sft import (
    ExampleStats,
    SFTExampleBuilder,
    tokenize_chat,
    tokenize_prompt_completion,
    tokenize_record,
    truncate,
)
from jaxpost.data.sources import (
    ArrayRecordSource,
    InMemorySource,
    JsonlSource,
    MalformedRecordError,
    MappedSource,
    TfdsSource,
    open_source,
    validate_record,
    write_array_record,
)

__all__ = [
    "ArrayRecordSource", "ExampleStats", "InMemorySource", "JsonlSource",
    "MalformedRecordError", "MappedSource", "PreferenceBatches", "SFTBatchIterator",
    "SFTDataOptions", "SFTExampleBuilder", "TfdsSource", "TooManyDroppedError", "check_batch",
    "check_preference_source", "encode_pair", "facts", "make_prompt_iterator", "make_sft_dataset",
    "make_sft_iterator", "open_preference_source", "open_source", "pack_examples", "packing",
    "pad_examples", "pair_batch", "preference", "preference_problem", "prompts",
    "record_dataset", "render_prompt", "sft", "sources", "synthetic", "tokenize_chat",
    "tokenize_prompt_completion", "tokenize_record", "truncate", "unpack_batch",
    "validate_record", "write_array_record",
]
