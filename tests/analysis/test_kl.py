"""jaxpost/analysis/kl.py and models.token_kl: exact full-vocabulary token KL to the base."""

import chex
import jax
import numpy as np
import pytest

from jaxpost.analysis.kl import probe_from_ids, probe_kl, read_probe_file
from jaxpost.models import Transformer, tiny, token_kl
from tests.analysis.analysis_testing import random_params


def _np_kl(lp, lq):
    p = np.exp(lp - lp.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(lq - lq.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


class TokenKLTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_token_kl_matches_numpy_and_is_zero_for_equal_logits(self):
        rng = np.random.default_rng(0)
        lp, lq = rng.normal(size=(2, 3, 11)) * 3, rng.normal(size=(2, 3, 11)) * 3
        kl = self.variant(token_kl)(lp, lq)
        chex.assert_shape(kl, (2, 3))
        np.testing.assert_allclose(kl, _np_kl(lp, lq), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(self.variant(token_kl)(lp, lp), 0.0, atol=1e-6)


@pytest.mark.slow  # ~4 s CPU: compiles the tiny model 4 times
def test_probe_kl_is_zero_for_identical_models_and_matches_numpy_over_real_tokens():
    cfg = tiny("llama", vocab_size=64)
    base = random_params(cfg, 0)
    tuned = jax.tree.map(lambda x, n: x + 0.5 * n, base, random_params(cfg, 1))
    probe = probe_from_ids([[1, 5, 9, 3, 7], [2, 4], [8, 8, 8]], pad_id=0)
    chex.assert_shape(probe.tokens, (3, 5))
    assert probe.num_tokens == 10
    same = probe_kl(cfg, jax.tree.map(np.copy, base), base, probe, batch_size=2)
    assert same.tokens == 10 and abs(same.mean) < 1e-6 and abs(same.max) < 1e-6
    got = probe_kl(cfg, tuned, base, probe, batch_size=2)  # a padded last batch
    apply = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))
    expected = []
    for row, seg in zip(probe.tokens, probe.segment_ids):
        n = int(seg.sum())  # each row alone, unpadded: padding must not change the answer
        lt = np.asarray(apply(tuned, row[None, :n]), np.float64)[0]
        lb = np.asarray(apply(base, row[None, :n]), np.float64)[0]
        expected.append(_np_kl(lt, lb))
    expected = np.concatenate(expected)
    assert got.mean > 1e-3
    np.testing.assert_allclose(got.mean, expected.mean(), rtol=1e-4)
    np.testing.assert_allclose(got.max, expected.max(), rtol=1e-4)


def test_probe_files_name_the_bad_line(tmp_path):
    path = tmp_path / "probe.jsonl"
    path.write_text('{"text": "a b"}\n{"prompt": "What"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"probe.jsonl:3: expected an object"):
        read_probe_file(path)
    path.write_text('{"text": "a b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"probe.jsonl:2: not JSON"):
        read_probe_file(path)
    with pytest.raises(ValueError, match="no empty row"):
        probe_from_ids([[1, 2], []])
