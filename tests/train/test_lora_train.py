"""LoRA through the recipes' plan and the train step: only adapters move, 8 devices equal
1, layer-restricted targets keep untargeted adapter rows at zero, the GRPO reference is
the base with the adapter off."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import sharding as sh
from jaxpost.models import param_logical_axes, tiny
from jaxpost.optim import OptimizerConfig, make_optimizer
from jaxpost.peft import lora as L
from jaxpost.peft import partition as P
from jaxpost.rl.rollout import build_rows
from jaxpost.train.common import ModelSection, model_init, plan_params, reference_params
from jaxpost.train.grpo import GRPOSection, make_grpo_loss
from jaxpost.train.sft import SFTConfig, make_sft_loss
from jaxpost.train.state import TrainState
from jaxpost.train.step import make_train_step, state_shardings

CFG = tiny("qwen2", num_layers=2, vocab_size=64)  # q/k/v biases stay frozen base tensors
SECTION = ModelSection(family="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
OPT_CFG = OptimizerConfig(lr=1e-2, weight_decay=0.1, schedule="constant")


def _plan(mesh, **lora):
    recipe = SFTConfig(lora=L.LoraConfig(rank=4, alpha=8.0, **lora))
    return plan_params(recipe, CFG, *model_init(SECTION, CFG, mesh, seed=0),
                       param_logical_axes(CFG), mesh)


def _sft_batch(seed=0, b=8, t=12):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, 64, (b, t)).astype(np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "segment_ids": np.ones((b, t), np.int32),
            "loss_mask": (rng.random((b, t)) < 0.7).astype(np.float32)}


def _grpo_batch(seed=0):
    rng = np.random.default_rng(seed)
    n, p, c = 8, 5, 4
    prompts = [list(rng.integers(1, 64, rng.integers(2, p + 1))) for _ in range(n)]
    batch = build_rows(prompts, rng.integers(1, 64, (n, c)).astype(np.int32),
                       rng.integers(1, c + 1, n), p, 0)
    batch["advantages"] = (rng.normal(size=(n, 1)) * batch["completion_mask"]).astype(np.float32)
    batch["ref_logp"] = (-4 + 0.1 * rng.normal(size=(n, c))).astype(np.float32)
    return batch


def _train(mesh, plan, loss_fn, batches, accum=2):
    opt = make_optimizer(OPT_CFG, 10)
    trainable, frozen = P.split(plan.init(), plan.mask)
    state = TrainState.create(trainable, opt, seed=0, frozen=frozen)
    shardings = state_shardings(jax.eval_shape(lambda: state), plan.shardings, mesh)
    state = jax.device_put(state, shardings)
    masks = P.update_masks(state.trainable, plan.mask)
    step = None
    for batch in batches:
        placed = sh.shard_batch(batch, mesh)
        if step is None:
            step = make_train_step(loss_fn, opt, mesh=mesh, state_sharding=shardings,
                                   batch_sharding=jax.tree.map(lambda x: x.sharding, placed),
                                   grad_accum_steps=accum, update_masks=masks)
        state, metrics = step(state, placed)
    return state, metrics


def _meshes():
    return ((jax.devices()[:1], sh.MeshConfig()),
            (jax.devices(), sh.MeshConfig(data=2, fsdp=2, tensor=2)))


@pytest.mark.slow
def test_lora_sft_step_trains_only_adapters_and_8_devices_equal_1():
    results = []
    for devices, mesh_cfg in _meshes():
        mesh = sh.make_mesh(mesh_cfg, devices)
        plan = _plan(mesh, targets=("q_proj", "v_proj"))
        start = jax.device_get(plan.init())
        state, metrics = _train(mesh, plan, make_sft_loss(plan.model_cfg),
                                [_sft_batch(i) for i in range(3)])
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
        assert set(jax.tree.leaves(jax.tree_util.tree_map_with_path(
            lambda p, _: p[-1].key, state.trainable))) == {"lora_a", "lora_b"}
        chex.assert_trees_all_equal(jax.device_get(state.frozen), L.strip_adapters(start))
    (p1, m1), (p8, m8) = results
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    chex.assert_trees_all_close(p1, p8, atol=1e-4, rtol=1e-4)
    b = p1["layers"]["self_attn"]["q_proj"]["lora_b"]
    assert np.abs(b).max() > 0  # B left zero: the adapters trained


@pytest.mark.slow
def test_lora_grpo_step_on_8_devices_equals_1_device():
    g = GRPOSection(num_generations=4, prompts_per_step=2, max_prompt_length=5,
                    max_completion_length=4, beta=0.04, loss_type="grpo")
    results = []
    for devices, mesh_cfg in _meshes():
        mesh = sh.make_mesh(mesh_cfg, devices)
        plan = _plan(mesh, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"))
        state, metrics = _train(mesh, plan, make_grpo_loss(plan.model_cfg, g),
                                [_grpo_batch(i) for i in range(2)])
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p8, m8) = results
    for k in ("loss", "kl"):
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(p1, p8, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_untargeted_layers_keep_zero_adapters_under_weight_decay():
    mesh = sh.make_mesh(sh.MeshConfig(), jax.devices()[:1])
    plan = _plan(mesh, targets=(r"model\.layers\.1\.self_attn\.q_proj",))
    state, _ = _train(mesh, plan, make_sft_loss(plan.model_cfg), [_sft_batch(i) for i in range(3)])
    q = jax.device_get(state.params["layers"]["self_attn"]["q_proj"])
    assert np.all(q["lora_a"][0] == 0) and np.all(q["lora_b"][0] == 0)
    assert np.abs(q["lora_b"][1]).max() > 0
    assert plan.counts.trainable == 4 * (64 + 64)  # one layer's A [64, 4] and B [4, 64]


def test_grpo_reference_under_lora_is_the_base_without_adapters_and_no_copy():
    mesh = sh.make_mesh(sh.MeshConfig(), jax.devices()[:1])
    plan = _plan(mesh, targets=("q_proj",))
    trainable, frozen = P.split(plan.init(), plan.mask)
    state = TrainState.create(trainable, make_optimizer(OPT_CFG, 10), seed=0, frozen=frozen)
    ref = reference_params(plan)(state)
    assert ref is state.frozen  # the frozen base itself: no second copy of the weights
    assert not L.has_adapters(ref)


@pytest.mark.slow
def test_grpo_reference_with_trained_base_tensors_is_their_start_not_the_current_state():
    mesh = sh.make_mesh(sh.MeshConfig(), jax.devices()[:1])
    recipe = SFTConfig(trainable=("norm",))
    plan = plan_params(recipe, CFG, *model_init(SECTION, CFG, mesh, seed=0),
                       param_logical_axes(CFG), mesh)
    start = jax.device_get(plan.init())
    trainable, frozen = P.split(plan.init(), plan.mask)
    moved = jax.tree.map(lambda x: x + 1.0, trainable)  # as if training had moved them
    state = TrainState.create(moved, make_optimizer(OPT_CFG, 10), seed=0, frozen=frozen)
    ref = jax.device_get(reference_params(plan)(state))
    chex.assert_trees_all_equal(ref, start)


@pytest.mark.slow
def test_lora_dropout_only_in_the_training_forward():
    mesh = sh.make_mesh(sh.MeshConfig(), jax.devices()[:1])
    plan = _plan(mesh, targets=("q_proj", "v_proj"), dropout=0.5)
    params = plan.init()
    params = jax.tree_util.tree_map_with_path(  # nonzero B so the adapter path matters
        lambda p, x: x + 0.1 if p[-1].key == "lora_b" else x, params)
    loss_fn = jax.jit(make_sft_loss(plan.model_cfg))
    batch = jax.tree.map(jnp.asarray, _sft_batch())
    eval_a, eval_b = loss_fn(params, batch, None)[0], loss_fn(params, batch, None)[0]
    train_a = loss_fn(params, batch, jax.random.key(1))[0]
    train_b = loss_fn(params, batch, jax.random.key(2))[0]
    assert float(eval_a) == float(eval_b)
    assert float(train_a) != float(train_b) and float(train_a) != float(eval_a)
    assert dataclasses.asdict(plan.model_cfg)["lora_dropout"] == 0.5


@pytest.mark.slow
def test_lora_sft_from_an_hf_folder_exports_a_peft_adapter_on_that_folder(tmp_path):
    from jaxpost.config import to_config_dict
    from jaxpost.export import export
    from jaxpost.models import init_params, to_hf
    from jaxpost.train.__main__ import load_config
    from jaxpost.train.sft import train

    base = tmp_path / "base"
    to_hf(tiny("llama", num_layers=2, vocab_size=264), init_params(
        tiny("llama", num_layers=2, vocab_size=264), jax.random.key(3)), base)
    cfg = to_config_dict(SFTConfig())
    cfg.workdir = str(tmp_path / "run")
    cfg.model.hf_path = str(base)
    cfg.steps, cfg.log_every, cfg.eval_every = 2, 1, 0
    cfg.data.seq_len, cfg.data.batch_size, cfg.data.num_records = 32, 8, 64
    cfg.data.eval_batches = 0
    cfg.lora.rank, cfg.lora.targets = 4, ("q_proj", "v_proj")
    result = train(load_config(cfg)[0])
    assert int(result.state.step) == 2
    # Another run started from this one gets the merged model (adapters folded in).
    from jaxpost.models import param_shapes
    from jaxpost.train.common import params_of_run
    base_cfg = tiny("llama", num_layers=2, vocab_size=264)
    mesh = sh.make_mesh(sh.MeshConfig(), jax.devices()[:1])
    started = params_of_run(str(tmp_path / "run"), None, param_shapes(base_cfg),
                            sh.param_shardings(base_cfg, mesh))
    merged = L.merge_adapters(jax.device_get(result.state.params), 8.0 / 4)
    chex.assert_trees_all_close(jax.device_get(started), merged, atol=1e-6)
    export(str(tmp_path / "run"), str(tmp_path / "adapter"), peft=True)
    import json
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str(base.resolve())
