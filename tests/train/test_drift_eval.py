"""The recipes' drift eval (`eval.drift_prompts`): metrics per category and drift.json."""

import json

import jax
import numpy as np
import pytest

from jaxpost.data import alignment
from jaxpost.models import ModelConfig
from jaxpost.sampling import SampleOutput, Sampler
from jaxpost.sharding import MeshConfig, make_mesh
from jaxpost.tokenizer import load_tokenizer
from jaxpost.train.common import EvalSection, GenerationEval


class ConstantSampler:
    """Every prompt gets the completion `self.reply` (the sampler's output format)."""

    def __init__(self, tokenizer):
        self.tok, self.reply = tokenizer, ""

    def __call__(self, params, prompts, lengths, rng, sampling):
        ids = self.tok.encode(self.reply)
        tokens = np.tile(np.asarray(ids, np.int32), (prompts.shape[0], 1))
        return SampleOutput(tokens=tokens, logprobs=np.zeros(tokens.shape, np.float32),
                            lengths=np.full(prompts.shape[0], len(ids), np.int32),
                            truncated=np.zeros(prompts.shape[0], bool))


def test_generation_eval_logs_drift_and_compares_first_with_latest_step(tmp_path):
    tok = load_tokenizer("byte")
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, hidden_size=32,
                      intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=16)
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    section = EvalSection(drift_prompts=2, drift_max_new_tokens=4, batch_size=8)
    ev = GenerationEval(section, cfg, tok, mesh, seed=0, workdir=str(tmp_path))
    assert isinstance(ev.sampler, Sampler)  # made for the drift eval alone (no task)
    ev.sampler = ConstantSampler(tok)
    ev.sampler.reply = "I can't<eos>"
    first = ev(None, 0)
    unsafe = {f"refusal_rate/{c}": 1.0 for c in alignment.UNSAFE}
    safe = {f"answer_rate/{c}": 0.0 for c in alignment.SAFE}
    assert first == {"refusal_rate": 1.0, "answer_rate": 0.0, **unsafe, **safe}
    ev.sampler.reply = "Sure<eos>"
    later = ev(None, 7)
    assert later["refusal_rate"] == 0.0 and later["answer_rate/cooking"] == 1.0
    stored = json.loads((tmp_path / "drift.json").read_text())
    assert (stored["before_step"], stored["after_step"]) == (0, 7)
    assert sorted(stored["steps"], key=int) == ["0", "7"]
    assert (stored["refusal_drop"], stored["answer_drop"]) == (1.0, -1.0)
    assert len(stored["samples"]) == 2 * len(alignment.CATEGORIES)
    assert stored["samples"][0]["completion"] == "Sure"
    # A resumed run that evaluates step 5 again drops the steps after it.
    ev(None, 5)
    assert sorted(json.loads((tmp_path / "drift.json").read_text())["steps"]) == ["0", "5"]


def test_eval_section_rejects_negative_drift_prompts():
    with pytest.raises(ValueError, match="drift_prompts must be >= 0"):
        EvalSection(drift_prompts=-1)
