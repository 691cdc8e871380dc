"""Packing invariance: the SFT loss of packed rows equals that of one example per row."""

import jax
import numpy as np

from jaxpost.data import synthetic
from jaxpost.data.packing import pack_examples, pad_examples
from jaxpost.data.sft import SFTExampleBuilder
from jaxpost.models import init_params, tiny
from jaxpost.tokenizer import load_tokenizer
from jaxpost.train.sft import make_sft_loss


def test_packed_loss_equals_unpacked_loss():
    tok = load_tokenizer("byte")
    builder = SFTExampleBuilder(tok, 64)
    examples = []
    for rec in synthetic.make_addition_records(12, seed=3, max_digits=3):
        ex, status = builder.build(rec)
        assert ex is not None, status
        examples.append(ex)
    packed = pack_examples(examples, 64)
    unpacked = pad_examples(examples, 64)
    assert len(packed["tokens"]) < len(unpacked["tokens"])  # something was packed
    assert packed["segment_ids"].max() > 1

    cfg = tiny("llama", vocab_size=tok.vocab_size)
    params = init_params(cfg, jax.random.key(0))
    loss_fn = jax.jit(make_sft_loss(cfg))
    s_packed, c_packed, _ = loss_fn(params, packed, None)
    s_unpacked, c_unpacked, _ = loss_fn(params, unpacked, None)
    assert float(c_packed) == float(c_unpacked) == sum(ex["loss_mask"][1:].sum() for ex in examples)
    np.testing.assert_allclose(float(s_packed), float(s_unpacked), rtol=1e-5)
