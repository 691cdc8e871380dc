"""jaxpost/rl/reward_model.py: Bradley–Terry loss, last-token scoring, the reward function."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import sharding as sh
from jaxpost.checkpoint import Checkpointer
from jaxpost.models import init_params, tiny
from jaxpost.rl import reward_model as rm
from jaxpost.rl.rewards import RewardSet
from jaxpost.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
CFG = tiny("llama", num_layers=1, vocab_size=TOK.vocab_size, hidden_size=32, head_dim=8,
           intermediate_size=64)


score = jax.jit(lambda params, tokens, seg: rm.reward_scores(CFG, params, tokens, seg))


def _params(seed=0, head_std=0.5):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"model": init_params(CFG, k1), "score": rm.init_head(CFG, k2, std=head_std)}


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def test_bradley_terry_loss_and_metrics_match_numpy():
    chosen = np.array([2.0, -1.0, 0.5, 30.0, -40.0, 1.0], np.float32)
    rejected = np.array([1.0, 0.0, 0.5, -30.0, 40.0, 3.0], np.float32)
    weights = np.array([1, 1, 1, 1, 1, 0], np.float32)  # the last pair is padding
    loss_sum, count, aux = rm.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected),
                                                 jnp.asarray(weights))
    m = chosen - rejected
    np.testing.assert_allclose(loss_sum, -np.sum(_np_log_sigmoid(m) * weights), rtol=1e-6)
    assert float(count) == 5.0
    assert np.isfinite(float(loss_sum))  # margin -80 does not overflow
    acc = np.array([1, 0, 0.5, 1, 0, 0])  # a tie counts one half
    mean = lambda s_w: float(s_w[0]) / float(s_w[1])  # noqa: E731
    np.testing.assert_allclose(mean(aux["accuracy"]), np.sum(acc * weights) / 5)
    np.testing.assert_allclose(mean(aux["margin"]), np.sum(m * weights) / 5, rtol=1e-6)
    np.testing.assert_allclose(mean(aux["reward_chosen"]), np.sum(chosen * weights) / 5, rtol=1e-6)
    np.testing.assert_allclose(mean(aux["reward_rejected"]), np.sum(rejected * weights) / 5,
                               rtol=1e-6)


def test_sanity_numbers_and_centring_term():
    loss_sum, count, _ = rm.bradley_terry_loss(jnp.zeros(4), jnp.zeros(4))
    np.testing.assert_allclose(float(loss_sum) / float(count), np.log(2.0), rtol=1e-6)
    c, r = jnp.array([1.0, 2.0]), jnp.array([0.5, -1.0])
    plain, _, _ = rm.bradley_terry_loss(c, r)
    centred, _, _ = rm.bradley_terry_loss(c, r, center_rewards_coefficient=0.1)
    np.testing.assert_allclose(float(centred - plain), 0.1 * (1.5 ** 2 + 1.0 ** 2), rtol=1e-5)


def test_gradient_of_loss_is_minus_sigmoid_of_minus_margin():
    c, r = jnp.array([0.3, -2.0]), jnp.array([1.0, 1.0])
    g = jax.grad(lambda c: rm.bradley_terry_loss(c, r)[0])(c)
    np.testing.assert_allclose(g, -1 / (1 + np.exp(np.asarray(c - r))), rtol=1e-5)


def test_last_token_index_with_right_left_and_empty_rows():
    seg = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rm.last_token_index(jnp.asarray(seg)), [2, 4, 3, 0])


def test_score_depends_only_on_real_tokens():
    params = _params()
    seqs = [rm.encode_sequence(TOK, "<bos><|user|>What is 2+3?<|assistant|>", "5"),
            rm.encode_sequence(TOK, "<bos><|user|>Hi<|assistant|>", "hello there")]
    tokens, seg, _ = rm.pad_sequences(seqs, 32, TOK.pad_id)
    base = score(params, jnp.asarray(tokens), jnp.asarray(seg))
    assert base.shape == (2,) and base.dtype == jnp.float32
    garbage = np.where(seg == 0, np.random.default_rng(0).integers(0, 256, tokens.shape),
                       tokens).astype(np.int32)
    np.testing.assert_allclose(score(params, jnp.asarray(garbage), jnp.asarray(seg)),
                               base, rtol=1e-5, atol=1e-6)
    for i, ids in enumerate(seqs):  # each row alone, unpadded
        alone = score(params, jnp.asarray([ids], jnp.int32),
                                 jnp.ones((1, len(ids)), jnp.int32))
        np.testing.assert_allclose(alone[0], base[i], rtol=1e-5, atol=1e-6)
    # ...and it does depend on the last real token.
    changed = tokens.copy()
    changed[0, len(seqs[0]) - 2] = ord("6")
    assert abs(float(score(params, jnp.asarray(changed), jnp.asarray(seg))[0])
               - float(base[0])) > 1e-6


def test_zero_head_scores_every_sequence_as_its_bias():
    params = _params(head_std=0.0)
    params["score"]["bias"] = jnp.array([0.25])
    tokens, seg, _ = rm.pad_sequences([[1, 2, 3], [4]], 8, TOK.pad_id)
    np.testing.assert_allclose(score(params, tokens, seg), [0.25, 0.25])


def test_loss_on_8_device_mesh_equals_one_device():
    mesh = sh.make_mesh(sh.MeshConfig(fsdp=-1))
    shardings = rm.rm_param_shardings(CFG, mesh)
    assert shardings["score"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
    params = _params()
    rng = np.random.default_rng(1)
    t = rng.integers(0, 256, (8, 12)).astype(np.int32)
    seg = (np.arange(12)[None] < rng.integers(3, 13, (8, 1))).astype(np.int32)
    batch = {"chosen_tokens": t, "chosen_segment_ids": seg, "rejected_tokens": t[::-1].copy(),
             "rejected_segment_ids": seg[::-1].copy()}
    loss_fn = rm.make_reward_model_loss(CFG)
    want, _, want_aux = jax.jit(loss_fn)(params, batch, None)

    def fn(p, b):
        with sh.logical_rules(mesh):
            return loss_fn(p, b, None)

    got, count, aux = jax.jit(fn, in_shardings=(shardings, None))(
        jax.device_put(params, shardings), sh.shard_batch(batch, mesh))
    assert float(count) == 8.0
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(aux["margin"][0], want_aux["margin"][0], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ as a reward function
@pytest.fixture(scope="module")
def rm_workdir(tmp_path_factory):
    """A reward-model checkpoint as the trainer writes it (no training needed here)."""
    workdir = str(tmp_path_factory.mktemp("rm"))
    params = _params(seed=3)
    metadata = {"config": {"trainer": "reward_model", "data": {"tokenizer": "byte", "seq_len": 40}},
                "model": dataclasses.asdict(CFG), "reward_model": {"pooling": "last_token"}}
    with Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        ckpt.save(5, {"params": params, "step": jnp.int32(5)}, metadata=metadata)
    return workdir, params


def test_reward_from_workdir_scores_prompt_plus_completion(rm_workdir):
    workdir, params = rm_workdir
    reward = rm.from_workdir(workdir=workdir, batch_size=4)
    prompts = [TOK.apply_chat_template([{"role": "user", "content": f"What is {i}+1?"}],
                                       add_generation_prompt=True) for i in range(7)]
    completions = [str(i + 1) for i in range(7)]
    scores = reward(prompts, completions, answer=completions)  # 7 rows: 2 batches, one padded
    assert len(scores) == 7 and all(isinstance(s, float) for s in scores)
    seqs = [rm.encode_sequence(TOK, p, c) for p, c in zip(prompts, completions)]
    tokens, seg, _ = rm.pad_sequences(seqs, 40, TOK.pad_id)
    np.testing.assert_allclose(scores, score(params, tokens, seg), rtol=1e-4,
                               atol=1e-5)
    # A truncated completion gets no EOS, so its score differs.
    cut = reward(prompts[:1], completions[:1], truncated=[True])
    assert abs(cut[0] - scores[0]) > 1e-6


def test_reward_model_plugs_into_reward_set_by_spec(rm_workdir):
    workdir, _ = rm_workdir
    rs = RewardSet([f"jaxpost.rl.reward_model:from_workdir(workdir={workdir!r}, batch_size=8)",
                    "jaxpost.rl.rewards:exact_answer"], weights=(0.5, 1.0))
    assert rs.names == ["from_workdir", "exact_answer"]
    total, per = rs(["What is 1+1?"] * 3, ["2", "3", "2"], {"answer": ["2", "2", "2"]})
    assert per["from_workdir"].shape == (3,) and np.all(np.isfinite(per["from_workdir"]))
    np.testing.assert_allclose(total, 0.5 * per["from_workdir"] + per["exact_answer"])


def test_reward_from_a_non_reward_model_workdir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        rm.RewardModelReward(str(tmp_path))
    with Checkpointer(os.path.join(tmp_path, "checkpoints"), async_save=False) as ckpt:
        ckpt.save(1, {"params": init_params(CFG, jax.random.key(0))},
                  metadata={"config": {"trainer": "sft"}, "model": dataclasses.asdict(CFG)})
    with pytest.raises(ValueError, match="'sft'.*no score head"):
        rm.RewardModelReward(str(tmp_path))
