"""SFT against TRL 1.16 itself: `SFTTrainer`'s dataset preparation and `compute_loss` vs
jaxpost's SFT data path (`SFTExampleBuilder`) and SFT loss (`make_sft_loss` through the
train step), on prompt/completion records and on multi-turn `messages` rendered with
TRL's own Llama-3 and Qwen2.5 training templates (`trl/chat_templates/*_training.jinja`,
whose `{% generation %}` blocks mark what is trained). Identical token ids, loss masks
and loss. The tokenizer is a local byte-level BPE one (tests/tokenizer_testing.py) with
the templates' special tokens; the model a tiny random Llama saved with
`save_pretrained`. Skipped without TRL 1.16.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
import pytest

trl = pytest.importorskip("trl")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
if not trl.__version__.startswith("1.16."):
    pytest.skip(f"these parity tests pin TRL 1.16 (found {trl.__version__})",
                allow_module_level=True)

from jaxpost.data.sft import SFTExampleBuilder  # noqa: E402
from jaxpost.models import from_hf  # noqa: E402
from jaxpost.tokenizer import load_tokenizer  # noqa: E402
from jaxpost.train.sft import make_sft_loss  # noqa: E402
from jaxpost.train.state import TrainState  # noqa: E402
from jaxpost.train.step import train_step  # noqa: E402
from tests.tokenizer_testing import make_hf_tokenizer_dir  # noqa: E402

pytestmark = pytest.mark.slow

TEMPLATES = os.path.join(os.path.dirname(trl.__file__), "chat_templates")
LLAMA3 = ("llama3_training.jinja", "<|eot_id|>",
          ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
          "<|begin_of_text|>")
QWEN25 = ("qwen2_5_training.jinja", "<|im_end|>", (), None)
CHATML = ("", "<|im_end|>", (), None)  # tests/tokenizer_testing's ChatML (no markers)

CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is 3+4?"},
     {"role": "assistant", "content": "It is 7."},
     {"role": "user", "content": "And 12+30?"},
     {"role": "assistant", "content": "42, the quick answer."}],
    [{"role": "user", "content": "hello world"},
     {"role": "assistant", "content": "héllo wörld, ça va?"}],
]
# Prompts that end where the BPE pre-tokenizer splits anyway (before a space), so that
# tokenizing prompt and completion separately (jaxpost) and joined (TRL) agree.
PROMPT_COMPLETION = [
    {"prompt": "What is 12+30?", "completion": " 42."},
    {"prompt": "the quick brown fox", "completion": " jumps over the lazy dog"},
]


def _setup(root, template):
    name, eos, specials, bos = template
    chat_template = open(os.path.join(TEMPLATES, name)).read() if name else None
    kw = {"chat_template": chat_template} if chat_template else {}
    path = make_hf_tokenizer_dir(root / (name or "chatml"), eos_token=eos, bos_token=bos,
                                 extra_specials=specials, **kw)
    return path, transformers.AutoTokenizer.from_pretrained(path), load_tokenizer(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sft_parity")


def _model(root, vocab):
    path = root / f"model{vocab}"
    if not path.exists():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=128, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
        model.save_pretrained(path)
    return path


def _trl_prepared(root, hf_tok, records, assistant_only_loss):
    model = transformers.LlamaForCausalLM.from_pretrained(_model(root, len(hf_tok)))
    args = trl.SFTConfig(output_dir=str(root / "out"), assistant_only_loss=assistant_only_loss,
                         max_length=None, report_to=[], use_cpu=True, bf16=False,
                         per_device_train_batch_size=len(records))
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=hf_tok,
                             train_dataset=datasets.Dataset.from_list(records))
    trainer.model.train()
    return trainer


def _jax_loss(root, vocab, examples, width=96):
    cfg, params = from_hf(_model(root, vocab))
    tokens = np.zeros((len(examples), width), np.int32)
    mask = np.zeros((len(examples), width), np.float32)
    seg = np.zeros((len(examples), width), np.int32)
    for i, ex in enumerate(examples):
        n = len(ex["tokens"])
        tokens[i, :n], mask[i, :n], seg[i, :n] = ex["tokens"], ex["loss_mask"], 1
    batch = {"tokens": tokens, "loss_mask": mask, "segment_ids": seg,
             "positions": np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape).copy()}
    state = TrainState.create(params, optax.sgd(0.0), seed=0)
    _, metrics = jax.jit(lambda s, b: train_step(s, b, loss_fn=make_sft_loss(cfg),
                                                 optimizer=optax.sgd(0.0)))(state, batch)
    return float(metrics["loss"])


def _compare(root, template, records, assistant_only_loss):
    _, hf_tok, tok = _setup(root, template)
    trainer = _trl_prepared(root, hf_tok, records, assistant_only_loss)
    prepared = [trainer.train_dataset[i] for i in range(len(records))]
    builder = SFTExampleBuilder(tok, max_len=4096)
    ours = [builder.build(r)[0] for r in records]
    for theirs, mine in zip(prepared, ours):
        assert list(mine["tokens"]) == list(theirs["input_ids"])
        trl_mask = (np.asarray(theirs["labels"]) != -100).astype(np.float32)
        trl_mask[0] = 0.0  # never a target (TRL's shifted loss ignores it too)
        np.testing.assert_array_equal(mine["loss_mask"], trl_mask)
        assert 0 < mine["loss_mask"].sum() < len(mine["tokens"])
    batch = trainer.data_collator(prepared)
    with torch.no_grad():
        expected = float(trainer.compute_loss(trainer.model, batch))
    np.testing.assert_allclose(_jax_loss(root, len(hf_tok), ours), expected, rtol=1e-4)
    return ours


@pytest.mark.parametrize("template", [LLAMA3, QWEN25], ids=["llama3", "qwen2.5"])
def test_messages_with_generation_markers_match_trl_assistant_only_loss(root, template):
    ours = _compare(root, template, [{"messages": m} for m in CONVERSATIONS], True)
    # The marked block includes the end-of-turn token (and, for Qwen2.5, the newlines
    # around the content): trained on, as TRL does.
    _, _, tok = _setup(root, template)
    eos = tok.encode(template[1])[0]
    ex = ours[0]
    assert eos in ex["tokens"][ex["loss_mask"] > 0]


def test_prompt_completion_records_match_trl_completion_only_loss(root):
    _compare(root, CHATML, PROMPT_COMPLETION, False)


def test_qwen_training_template_mask_is_the_marked_block_not_the_span_rule(root):
    """The issue's case: on TRL's Qwen2.5 training template the span rule (generation
    prompt to end of turn, trailing whitespace trimmed) trained on fewer tokens than
    TRL; with the markers jaxpost trains on exactly the marked ones."""
    from jaxpost.data import sft
    _, _, tok = _setup(root, QWEN25)
    marked = sft.tokenize_chat(tok, CONVERSATIONS[0])
    text, spans = sft.assistant_spans(tok, CONVERSATIONS[0])
    ids, offsets = tok.encode_with_offsets(text)
    span_rule = sum(any(a <= o[0] < b for a, b in spans) for o in offsets)
    assert list(marked["tokens"]) == list(ids)
    assert marked["loss_mask"].sum() > span_rule  # the newlines inside the block
