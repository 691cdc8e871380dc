"""jaxpost/rl/gaze_reward.py: the GazeReward projector, GazeAdd / GazeConcat injections,
the gaze switch, and a gaze reward model as a reward function."""

import dataclasses
import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.checkpoint import Checkpointer
from jaxpost.models import tiny
from jaxpost.rl import gaze_reward as gz
from jaxpost.rl import reward_model as rm
from jaxpost.rl.rewards import RewardSet
from jaxpost.tokenizer import ByteTokenizer
from tests.gaze_testing import FakeTokenGaze, fake_trt

TOK = ByteTokenizer()
CFG = tiny("llama", num_layers=1, vocab_size=TOK.vocab_size, hidden_size=32, head_dim=8,
           intermediate_size=64)
ADD = gz.GazeSpec(mode="add", num_features=2, width=16)
CONCAT = gz.GazeSpec(mode="concat", num_features=2, width=16)

# Jitted once per spec (eager Flax applies are slow on a shared CPU).
project = jax.jit(gz.project, static_argnums=(0, 1))
gaze_inputs = jax.jit(gz.gaze_inputs, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnames=("spec",))
def score(params, tokens, seg, feats=None, spec=None):
    return rm.reward_scores(CFG, params, tokens, seg, gaze=spec, gaze_features=feats)


@functools.cache
def _params(spec=None, seed=0):
    """Random reward-model params (+ gaze params for `spec`), filled on the host: no init
    program to compile (norm scales near 1, everything else N(0, 0.2^2))."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        x = rng.normal(0.0, 0.2, s.shape) + (1.0 if path[-1].key == "scale" else 0.0)
        return jnp.asarray(x, s.dtype)
    return jax.tree_util.tree_map_with_path(fill, rm.rm_param_shapes(CFG, spec))


def _rows(seed=0, b=3, t=10, k=2):
    """Right-padded rows (lengths 10, 6, 3) with random tokens and features."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (b, t)).astype(np.int32)
    seg = (np.arange(t)[None] < np.array([[t], [6], [3]])[:b]).astype(np.int32)
    feats = rng.uniform(0, 3, (b, t, k)).astype(np.float32) * seg[..., None]
    return jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(feats)


# ---------------------------------------------------------------------------- projector
def _np_layer_norm(x, scale, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


class ProjectorTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_projector_matches_a_numpy_reference_with_pytorch_init_bounds(self):
        params = gz.init_gaze(ADD, CFG, jax.random.key(1))
        p = jax.tree.map(np.asarray, params["projector"])
        chex.assert_shape(p["fc1"]["kernel"], (2, 16))
        chex.assert_shape(p["fc2"]["kernel"], (16, 32))
        chex.assert_shape((p["norm1"]["scale"], p["norm2"]["bias"]), [(16,), (32,)])
        # PyTorch nn.Linear init: |w|, |b| <= 1/sqrt(fan_in); biases are not zero.
        assert np.abs(p["fc1"]["bias"]).max() <= 1 / np.sqrt(2) and np.abs(p["fc1"]["bias"]).min() > 0
        assert np.abs(p["fc2"]["kernel"]).max() <= 1 / np.sqrt(16)
        p["norm1"]["scale"] = np.linspace(0.5, 1.5, 16, dtype=np.float32)  # not the identity
        p["norm2"]["bias"] = np.linspace(-1, 1, 32, dtype=np.float32)
        f = np.random.default_rng(0).uniform(0, 3, (2, 5, 2)).astype(np.float32)
        got = self.variant(lambda pp, x: gz.project(ADD, CFG, {"projector": pp}, x))(p, f)
        h = f @ p["fc1"]["kernel"] + p["fc1"]["bias"]
        h = np.maximum(_np_layer_norm(h, p["norm1"]["scale"], p["norm1"]["bias"]), 0)
        h = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
        want = _np_layer_norm(h, p["norm2"]["scale"], p["norm2"]["bias"])
        chex.assert_shape(got, (2, 5, 32))
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

    @pytest.mark.slow
    def test_dropout_only_with_an_rng_and_the_features_size_matters(self):
        # k = 1: with PyTorch's non-zero biases, 0.5 and 2.0 project differently (a zero
        # bias would make LayerNorm(w·f) depend on the sign of f only).
        one = gz.GazeSpec(mode="add", num_features=1, width=16)
        params = gz.init_gaze(one, CFG, jax.random.key(2))
        f = jnp.array([[[0.5], [2.0]]])
        plain = project(one, CFG, params, f)
        assert float(jnp.abs(plain[0, 0] - plain[0, 1]).max()) > 1e-2
        dropped = project(one, CFG, params, f, jax.random.key(0))
        chex.assert_tree_all_finite(dropped)
        assert not np.allclose(plain, dropped)


# ------------------------------------------------------------------------------ GazeAdd
def test_gaze_add_with_a_zero_projector_equals_the_plain_model_scores_and_trunk_grads():
    plain = _params()
    gazed = dict(plain, gaze=jax.tree.map(jnp.zeros_like, gz.init_gaze(ADD, CFG,
                                                                          jax.random.key(4))))
    tokens, seg, feats = _rows()

    @functools.partial(jax.jit, static_argnums=2)
    def loss_and_grad(trunk, extra, spec):
        def loss(trunk):
            s = rm.reward_scores(CFG, dict(trunk, **extra), tokens, seg, gaze=spec,
                                 gaze_features=feats)
            return jnp.sum(jnp.sin(s)), s
        return jax.value_and_grad(loss, has_aux=True)(trunk)

    trunk = {"model": plain["model"], "score": plain["score"]}
    (v0, s0), g0 = loss_and_grad(trunk, {}, None)
    (v1, s1), g1 = loss_and_grad(trunk, {"gaze": gazed["gaze"]}, ADD)
    chex.assert_trees_all_close(s1, s0, rtol=1e-6)
    chex.assert_trees_all_close(v1, v0, rtol=1e-6)
    chex.assert_trees_all_close(g1, g0, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g0["model"]["embed_tokens"]["embedding"]).max()) > 0  # not vacuous


def test_gaze_add_embeds_are_token_rows_plus_projection_on_real_tokens_only():
    params = _params(ADD)
    tokens, seg, feats = _rows()
    _, seg_out, _, x = gaze_inputs(ADD, CFG, params, tokens, seg, None, feats)
    table = np.asarray(params["model"]["embed_tokens"]["embedding"])
    e = np.asarray(project(ADD, CFG, params["gaze"], feats))
    want = table[np.asarray(tokens)] + e * np.asarray(seg)[..., None]
    assert np.abs(e).min() > 0  # a real projector: the scores move with the features
    chex.assert_trees_all_close(x, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(seg_out, seg)


# --------------------------------------------------------------------------- GazeConcat
def test_gaze_concat_layout_places_separators_gaze_and_text_at_the_specified_positions():
    v = CFG.vocab_size
    tokens = jnp.array([[10, 11, 12, 0], [0, 0, 20, 21], [0, 0, 0, 0]], jnp.int32)
    seg = jnp.array([[1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]], jnp.int32)  # right, left, empty
    lay = jax.jit(gz.concat_layout, static_argnums=2)(tokens, seg, v)
    chex.assert_shape(list(lay.values()), (3, 10))
    np.testing.assert_array_equal(lay["tokens"], [[v, 0, 0, 0, v + 1, 10, 11, 12, 0, 0],
                                                  [v, 0, 0, v + 1, 20, 21, 0, 0, 0, 0],
                                                  [0] * 10])
    np.testing.assert_array_equal(lay["is_gaze"], [[0, 1, 1, 1, 0, 0, 0, 0, 0, 0],
                                                   [0, 1, 1, 0, 0, 0, 0, 0, 0, 0],
                                                   [0] * 10])
    np.testing.assert_array_equal(lay["gaze_index"][:2], [[0, 0, 1, 2, 0, 0, 0, 0, 0, 0],
                                                          [0, 2, 3, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(lay["segment_ids"], [[1] * 8 + [0] * 2,
                                                       [1] * 6 + [0] * 4, [0] * 10])
    np.testing.assert_array_equal(lay["positions"][1], np.arange(10))
    np.testing.assert_array_equal(rm.last_token_index(lay["segment_ids"]), [7, 5, 0])


@pytest.mark.slow
def test_gaze_concat_assembles_the_embedding_sequence_and_reads_the_score_at_the_last_text_token():
    params = _params(CONCAT)
    tokens, seg, feats = _rows()
    ids, seg_out, pos, x = gaze_inputs(CONCAT, CFG, params, tokens, seg, None, feats)
    chex.assert_shape(x, (3, 22, 32))
    table = np.asarray(params["model"]["embed_tokens"]["embedding"])
    sep = np.asarray(params["gaze"]["separators"])
    e = np.asarray(project(CONCAT, CFG, params["gaze"], feats))
    x, tok = np.asarray(x), np.asarray(tokens)
    for row, n in enumerate((10, 6, 3)):
        np.testing.assert_allclose(x[row, 0], sep[0], rtol=1e-6)  # <eye/>
        np.testing.assert_allclose(x[row, 1:n + 1], e[row, :n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x[row, n + 1], sep[1], rtol=1e-6)  # </eye>
        np.testing.assert_allclose(x[row, n + 2:2 * n + 2], table[tok[row, :n]], rtol=1e-6)
        np.testing.assert_array_equal(seg_out[row], (np.arange(22) < 2 * n + 2).astype(np.int32))
    # The grown table: <eye/> and </eye> are ids V and V + 1.
    assert int(ids[0, 0]) == CFG.vocab_size and int(ids[2, 4]) == CFG.vocab_size + 1
    # The score: the plain head on the hidden state at 2n + 1 of that assembled input.
    from jaxpost.models import Transformer
    hidden = jax.jit(functools.partial(Transformer(CFG).apply, return_hidden=True))(
        {"params": params["model"]}, ids, positions=pos, segment_ids=seg_out,
        inputs_embeds=jnp.asarray(x))
    last = hidden[jnp.arange(3), jnp.array([21, 13, 7])]
    want = last @ params["score"]["kernel"][:, 0] + params["score"]["bias"][0]
    got = score(params, tokens, seg, feats, spec=CONCAT)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    # Padding stays inert: garbage in padded token / feature slots changes nothing.
    junk_t = jnp.where(seg == 0, 77, tokens)
    junk_f = jnp.where(seg[..., None] == 0, 9.0, feats)
    chex.assert_trees_all_close(
        score(params, junk_t, seg, junk_f, spec=CONCAT), got,
        rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the switch
def test_gaze_off_is_the_plain_reward_model():
    off = gz.GazeSpec(mode="off", num_features=2)
    assert rm.rm_param_shapes(CFG, off).keys() == {"model", "score"}
    assert "gaze" in rm.rm_param_shapes(CFG, ADD)
    params = _params()
    tokens, seg, feats = _rows()
    batch = {"chosen_tokens": tokens, "chosen_segment_ids": seg, "chosen_gaze": feats,
             "rejected_tokens": tokens[::-1], "rejected_segment_ids": seg[::-1],
             "rejected_gaze": feats[::-1] * 3}
    # The very same program as the plain reward model's (features ignored).
    plain = jax.make_jaxpr(rm.make_reward_model_loss(CFG))(params, batch, None)
    gaze_off = jax.make_jaxpr(rm.make_reward_model_loss(CFG, gaze=off))(params, batch, None)
    assert str(gaze_off) == str(plain)
    gaze_on = jax.make_jaxpr(rm.make_reward_model_loss(CFG, gaze=ADD))(
        dict(params, gaze=gz.gaze_shapes(ADD, CFG)), batch, None)
    assert str(gaze_on) != str(plain)
    with pytest.raises(ValueError, match="gaze_features"):
        rm.reward_scores(CFG, _params(ADD), tokens, seg, gaze=ADD)
    with pytest.raises(ValueError, match="gaze.mode"):
        gz.GazeSpec(mode="sum")


def test_gaze_params_have_their_own_names_and_no_lora_adapters():
    from jaxpost.models.hf import leaf_hf_names
    from jaxpost.peft.lora import LoraConfig, LoraError, lora_targets
    shapes = rm.rm_param_shapes(CFG, CONCAT)
    names = {n for ns in leaf_hf_names(shapes).values() for n in ns}
    assert {"gaze.projector.fc1.weight", "gaze.projector.norm2.bias", "gaze.separators"} <= names
    # The projector trains in full: LoRA targets never see it ("proj" would match it).
    with pytest.raises(LoraError, match="matches no Linear weight"):
        lora_targets(shapes, LoraConfig(rank=2, targets=("fc1",)))
    targets = lora_targets(shapes, LoraConfig(rank=2, targets=("proj",)))
    assert targets and all(p[0] == "model" for p in targets)


# ------------------------------------------------------------------ as a reward function
@pytest.mark.slow
def test_gaze_reward_model_scores_completions_with_features_computed_at_reward_time(tmp_path):
    spec = gz.GazeSpec(mode="add", num_features=1, width=16)
    params = _params(spec, seed=3)
    info = {"mode": "add", "num_features": 1, "width": 16, "dropout": [0.1, 0.3],
            "predictor": "tests.gaze_testing:FakeTokenGaze()", "features": ["TRT"],
            "scale": [2.0]}
    metadata = {"config": {"trainer": "reward_model", "data": {"tokenizer": "byte", "seq_len": 40}},
                "model": dataclasses.asdict(CFG),
                "reward_model": {"pooling": "last_token", "gaze": info}}
    with Checkpointer(os.path.join(tmp_path, "checkpoints"), async_save=False) as ckpt:
        ckpt.save(1, {"params": params, "step": jnp.int32(1)}, metadata=metadata)
    reward = rm.from_workdir(workdir=str(tmp_path), batch_size=4)
    prompts = [TOK.apply_chat_template([{"role": "user", "content": "say abc"}],
                                       add_generation_prompt=True)] * 3
    completions = ["hej", "a longer answer", "x"]
    got = reward(prompts, completions, truncated=[False, True, False])
    ids, f = rm.encode_sequence_features(TOK, prompts[0], completions[0],
                                         reward.featurize)
    assert f[0, 0] == 0.0 and f[-1, 0] == 0.0  # BOS / EOS rows
    np.testing.assert_allclose(f[3, 0], fake_trt(ids[3]) / 2.0)  # scaled by 2
    tokens, seg, _ = rm.pad_sequences([ids], 40, TOK.pad_id)
    want = score(params, jnp.asarray(tokens), jnp.asarray(seg),
                 jnp.asarray(rm.pad_features([f], 40, 1)), spec=spec)
    np.testing.assert_allclose(got[0], float(want[0]), rtol=1e-5)
    # Through a RewardSet by spec, as GRPO loads it.
    rs = RewardSet([f"jaxpost.rl.reward_model:from_workdir(workdir={str(tmp_path)!r})"])
    total, _ = rs(prompts, completions, {"truncated": [False, True, False]})
    np.testing.assert_allclose(total, got, rtol=1e-6)
    assert isinstance(reward.featurize.predictor, FakeTokenGaze)
