"""AlignGuard through the SFT recipe: all λ = 0 is plain LoRA, the default adds an
alignment adapter, a step on 8 devices equals 1 device, and the Fisher CLI step is
reused by training."""

import json
import os
import subprocess
import sys

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
from jaxpost.peft.alignguard import AlignGuardConfig
from jaxpost.peft.fisher import Fisher, select_paths
from jaxpost.train.common import ModelSection, model_init, plan_params
from jaxpost.train.regularise import FisherSection, fisher_paths, recipe_regularisers
from jaxpost.train.sft import SFTConfig, make_sft_loss
from jaxpost.train.state import TrainState
from jaxpost.train.step import make_train_step, state_shardings
from tests.cli_testing import ROOT, TINY_SFT

CFG = tiny("llama", num_layers=2, vocab_size=64)
SECTION = ModelSection(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16)
LORA = L.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
FISHER = FisherSection(source="unused.jsonl")


def _recipe(**agl):
    return SFTConfig(lora=LORA, alignguard=AlignGuardConfig(enabled=True, **agl), fisher=FISHER)


def _plan(recipe, mesh):
    return plan_params(recipe, CFG, *model_init(SECTION, CFG, mesh, seed=0),
                       param_logical_axes(CFG), mesh)


def _fisher(plan, mesh_shardings=None):
    """A positive diagonal Fisher over the LoRA targets (values made up: the estimator
    is tested in tests/peft/test_fisher.py), placed like the kernels."""
    paths = fisher_paths(plan)
    shapes = select_paths(plan.abstract, paths)
    rng = np.random.default_rng(0)
    tree = jax.tree.map(lambda s: jnp.asarray(rng.random(s.shape) * 50, jnp.float32), shapes)
    if mesh_shardings is not None:
        tree = jax.device_put(tree, select_paths(mesh_shardings, paths))
    return Fisher("diagonal", tree, 8, {})


def test_all_lambdas_zero_is_plain_lora_and_the_default_adds_an_alignment_adapter():
    mesh = sh.make_mesh(sh.MeshConfig(), jax.devices()[:1])
    small = ModelSection(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16)
    cfg = tiny("llama", num_layers=1, vocab_size=64, hidden_size=32, intermediate_size=64,
               num_heads=2, num_kv_heads=1, head_dim=16)

    def plan_of(recipe):
        return plan_params(recipe, cfg, *model_init(small, cfg, mesh, seed=0),
                           param_logical_axes(cfg), mesh)
    zero = _recipe(lambda_a=0.0, lambda_t=0.0, lambda_nc=0.0)
    plain, off = plan_of(SFTConfig(lora=LORA)), plan_of(zero)
    assert recipe_regularisers(zero, off, None) == ()
    chex.assert_trees_all_equal_shapes_and_dtypes(off.abstract, plain.abstract)
    assert P.count_params(off.abstract, off.mask) == P.count_params(plain.abstract, plain.mask)
    assert off.model_cfg == plain.model_cfg
    default = plan_of(_recipe())
    q = default.abstract["layers"]["self_attn"]["q_proj"]
    assert {"lora_a", "lora_b", "lora_a_align", "lora_b_align"} <= set(q)
    counts = P.count_params(default.abstract, default.mask)
    assert counts.trainable == 2 * P.count_params(plain.abstract, plain.mask).trainable
    init = default.init()["layers"]["self_attn"]["q_proj"]
    assert not np.allclose(init["lora_a"], init["lora_a_align"])  # independent draws
    assert float(jnp.abs(init["lora_b_align"]).max()) == 0.0  # ΔW = 0 at the start
    (reg,) = recipe_regularisers(_recipe(), default, _fisher(default))
    assert reg.name == "alignguard"


def _batch(seed, b=8, t=12):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, 64, (b, t)).astype(np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "segment_ids": np.ones((b, t), np.int32),
            "loss_mask": (rng.random((b, t)) < 0.7).astype(np.float32)}


@pytest.mark.slow
def test_alignguard_step_on_8_devices_equals_1_device():
    results = []
    for devices, mesh_cfg in ((jax.devices()[:1], sh.MeshConfig()),
                              (jax.devices(), sh.MeshConfig(data=2, fsdp=2, tensor=2))):
        mesh = sh.make_mesh(mesh_cfg, devices)
        recipe = _recipe()
        plan = _plan(recipe, mesh)
        regs = recipe_regularisers(recipe, plan, _fisher(plan, plan.shardings))
        opt = make_optimizer(OptimizerConfig(lr=2e-2, schedule="constant"), 10)
        trainable, frozen = P.split(plan.init(), plan.mask)
        state = TrainState.create(trainable, opt, seed=0, frozen=frozen)
        shardings = state_shardings(jax.eval_shape(lambda s=state: s), plan.shardings, mesh)
        state = jax.device_put(state, shardings)
        step, history = None, []
        for i in range(3):
            batch = sh.shard_batch(_batch(i), mesh)
            if step is None:
                step = make_train_step(
                    make_sft_loss(plan.model_cfg), opt, mesh=mesh, state_sharding=shardings,
                    batch_sharding=jax.tree.map(lambda x: x.sharding, batch),
                    grad_accum_steps=2, update_masks=P.update_masks(state.trainable, plan.mask),
                    regularisers=regs)
            state, metrics = step(state, batch)
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        results.append((jax.device_get(state.trainable), history))
    (t1, h1), (t8, h8) = results
    for name in ("agl_fisher", "agl_stability", "agl_overlap", "agl_geodesic"):
        assert h1[-1][name] > 0, name  # every term is live after the first update
        np.testing.assert_allclose([h[name] for h in h8], [h[name] for h in h1], rtol=2e-3,
                                   atol=1e-9, err_msg=name)
    np.testing.assert_allclose([h["loss"] for h in h8], [h["loss"] for h in h1], rtol=1e-4)
    chex.assert_trees_all_close(t8, t1, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_fisher_cli_then_training_reuses_the_cached_fisher(tmp_path):
    align = tmp_path / "align.jsonl"
    records = [{"prompt": "how do I pick a lock?", "completion": "I can't help with that."},
               {"prompt": "what is 2+3?", "completion": "5"}] * 4
    align.write_text("".join(json.dumps(r) + "\n" for r in records))
    flags = [f"--config={ROOT}/configs/sft_demo.py", f"--config.workdir={tmp_path / 'run'}",
             *TINY_SFT, "--config.steps=2", "--config.eval.task=", "--config.lora.rank=4",
             "--config.alignguard.enabled=True", f"--config.fisher.source={align}",
             "--config.fisher.num_examples=6", "--config.fisher.batch_size=4"]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    made = subprocess.run([sys.executable, "-m", "jaxpost.fisher", *flags], env=env,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    assert "fisher: diagonal, 6 examples" in made.stdout
    assert (tmp_path / "run" / "fisher" / "fisher.json").exists()
    trained = subprocess.run([sys.executable, "-m", "jaxpost.train", *flags], env=env,
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "reusing the diagonal Fisher" in trained.stderr
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
               if x]
    assert {"agl_fisher", "agl_stability", "agl_overlap", "agl_geodesic", "task_loss",
            "reg_loss"} <= set(records[-1])
    refused = subprocess.run([sys.executable, "-m", "jaxpost.fisher", *flags,
                              "--config.model.rope_theta=500.0"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2
    assert "made for another model or data: model.rope_theta" in refused.stderr
