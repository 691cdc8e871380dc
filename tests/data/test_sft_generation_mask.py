"""`{% generation %}` assistant masks (transformers' `return_assistant_tokens_mask` rule)
on the byte tokenizer, where every token is one byte and the expected mask can be read
off the text."""

import chex
import numpy as np

from jaxpost.data import sft
from jaxpost.tokenizer import has_generation_markers, load_tokenizer, render_chat_template

MARKED = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>"
    "{%- generation %}{{ m['content'] }}<eos>\n{% endgeneration %}"
    "{% else %}<|user|>{{ m['content'] }}\n{% endif %}{% endfor %}")
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "né"}]


def test_marked_template_masks_exactly_the_generation_blocks():
    tok = load_tokenizer("byte", chat_template=MARKED)
    assert has_generation_markers(MARKED) and not has_generation_markers(tok.chat_template[:60])
    text, spans = tok.apply_chat_template_with_spans(CHAT)
    assert text == render_chat_template(MARKED, CHAT, **tok.chat_template_variables())
    assert [text[a:b] for a, b in spans] == ["ok<eos>\n", "né<eos>\n"]
    ex = sft.tokenize_record(tok, {"messages": CHAT})
    ids = list(ex["tokens"])
    assert ids == tok.encode(text)
    # Targets: "o" "k" <eos> "\n", then "n", the two bytes of "é", <eos>, "\n" (no EOS added).
    targets = tok.decode([i for i, m in zip(ids, ex["loss_mask"]) if m])
    assert targets == "ok<eos>\nné<eos>\n"
    assert int(ex["loss_mask"].sum()) == 4 + 5
    forced = sft.tokenize_chat(tok, CHAT, add_eos=True)  # add_eos=True: one more target
    assert int(forced["loss_mask"].sum()) == 10 and forced["tokens"][-1] == tok.eos_id


def test_generation_mask_follows_transformers_char_to_token_rule():
    offsets = [(0, 1), (1, 3), (3, 3), (3, 4), (3, 4), (5, 6)]  # a gap at char 4
    chex.assert_trees_all_equal(sft.generation_mask(offsets, [(1, 2)]),
                                np.array([0, 1, 0, 0, 0, 0], np.float32))
    # two byte tokens share a character: `char_to_token` gives the first (checked with
    # `tokenizers`), so a span ending on that character stops at the first byte
    chex.assert_trees_all_equal(sft.generation_mask(offsets, [(3, 4)]),
                                np.array([0, 0, 0, 1, 0, 0], np.float32))
    # last character in no token: to the end; first character in no token: stop
    chex.assert_trees_all_equal(sft.generation_mask(offsets, [(1, 5)]),
                                np.array([0, 1, 1, 1, 1, 1], np.float32))
    chex.assert_trees_all_equal(sft.generation_mask(offsets, [(4, 6), (0, 1)]),
                                np.zeros(6, np.float32))
