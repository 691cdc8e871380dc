"""GazeReward on the reward-model trainer: config, a training run that learns and resumes,
export with its projector sidecar, GazeConcat end to end, and GRPO with a GazeReward
model as its reward (model-level properties: tests/rl/test_gaze_reward.py)."""

import json
import os

import jax
import numpy as np
import pytest

from jaxpost.config import ConfigError, to_dataclass
from jaxpost.rl import reward_model as rm
from jaxpost.rl.gaze_reward import init_gaze
from jaxpost.train.__main__ import load_config
from jaxpost.train.common import load_recipe
from jaxpost.train.reward_model import GazeSection, RewardModelConfig, train
from tests.train.test_reward_model import _easy_pairs, read_metrics, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = "tests.gaze_testing:FakeTokenGaze()"


def gaze_config(workdir, data_path, mode="add", **over):
    cfg = small_config(workdir, source=data_path)
    cfg.gaze.mode = mode
    cfg.gaze.predictor = FAKE
    cfg.gaze.features = ("TRT", "FFD")
    cfg.gaze.scale = (1.0,)
    cfg.gaze.width = 16
    cfg.gaze.output_scale = 0.02  # e starts at the embeddings' scale (1.0 drowns them: README)
    for k, v in over.items():
        cfg[k] = v
    return cfg


def test_gaze_rm_demo_config_loads_and_bad_gaze_keys_are_named():
    cfg, fn = load_config(load_recipe(os.path.join(ROOT, "configs/gaze_rm_demo.py")))
    assert isinstance(cfg, RewardModelConfig) and fn is train
    assert cfg.gaze.mode == "add" and cfg.gaze.predictor == "psycholinguistic"
    assert cfg.gaze.spec() == rm.GazeSpec(mode="add", num_features=1, output_scale=0.02)
    assert RewardModelConfig().gaze.mode == "off"  # the plain reward model by default
    with pytest.raises(ConfigError, match="gaze.mode"):
        to_dataclass(RewardModelConfig, {"gaze": {"mode": "sum"}})
    with pytest.raises(ConfigError, match="gaze.scale"):
        to_dataclass(RewardModelConfig, {"gaze": {"features": ("TRT", "FFD"),
                                                  "scale": (1.0, 2.0, 3.0)}})
    assert "gaze.mode" in RewardModelConfig.identity_keys  # resuming with another mode: refused
    assert GazeSection(scale=(100.0,), features=("TRT", "FFD")).metadata()["scale"] == [100.0,
                                                                                        100.0]


@pytest.mark.slow
def test_gaze_add_trains_resumes_exports_with_its_sidecar_and_serves_as_a_grpo_reward(tmp_path):
    data_path = str(tmp_path / "easy.jsonl")
    _easy_pairs(data_path)
    workdir = tmp_path / "run"
    cfg = gaze_config(workdir, data_path, steps=16, checkpoint_every=8)
    first = train(to_dataclass(RewardModelConfig, cfg))
    state = first.state
    assert "gaze" in state.trainable and "gaze" not in state.frozen  # trains with the head
    metrics = read_metrics(workdir)
    assert abs(metrics[0]["loss"] - np.log(2)) < 1e-3  # zero head: every score 0
    assert np.mean([m["loss"] for m in metrics[-4:]]) < np.log(2) - 0.2
    model_cfg, _, metadata = rm.load_reward_model(str(workdir))
    start = init_gaze(rm.gaze_spec_of(metadata), model_cfg,
                      jax.random.fold_in(jax.random.key(0), 3))  # the trainer's gaze init
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         jax.device_get(state.params["gaze"]), start)
    assert min(jax.tree.leaves(moved)) > 0  # every projector tensor learned

    # Resume: the same workdir, more steps; the gaze params come back from the checkpoint.
    cfg.steps = 20
    resumed = train(to_dataclass(RewardModelConfig, cfg))
    assert int(resumed.state.step) == 20
    assert [m["step"] for m in read_metrics(workdir)] == list(range(1, 21))
    meta = json.loads(json.dumps(rm.load_reward_model(str(workdir))[2]["reward_model"]))
    assert meta["gaze"]["mode"] == "add" and meta["gaze"]["features"] == ["TRT", "FFD"]
    with pytest.raises(Exception, match="gaze.mode"):  # another gaze mode is another model
        train(to_dataclass(RewardModelConfig, gaze_config(workdir, data_path, mode="concat",
                                                          steps=21)))

    # init_from a reward model with another gaze mode: its backbone and head, new gaze params.
    from jaxpost import sharding as sh
    from jaxpost.train.reward_model import _reward_model_start
    concat = rm.GazeSpec(mode="concat", num_features=2, width=16)
    fresh = init_gaze(concat, model_cfg, jax.random.key(7))
    start = _reward_model_start(str(workdir), None, model_cfg, concat,
                                sh.make_mesh(sh.MeshConfig(), jax.devices()[:1]), lambda: fresh)
    final = jax.device_get(resumed.state.params)
    for key in ("model", "score"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(start[key]), final[key])
    assert start["gaze"] is fresh and "separators" in start["gaze"]

    # Export: the HF trunk + the projector sidecar, equal to the trained params.
    from safetensors.numpy import load_file as read_safetensors

    from jaxpost.export import GAZE_CONFIG_FILE, GAZE_WEIGHTS_FILE, export_run
    out = tmp_path / "hf"
    result = export_run(str(workdir), str(out))
    assert result.kind == "reward_model"
    assert any("GazeReward" in w for w in result.warnings)
    side = read_safetensors(str(out / GAZE_WEIGHTS_FILE))
    proj = jax.device_get(resumed.state.params["gaze"]["projector"])
    np.testing.assert_array_equal(side["fc1.weight"], np.asarray(proj["fc1"]["kernel"]).T)
    np.testing.assert_array_equal(side["norm2.bias"], np.asarray(proj["norm2"]["bias"]))
    assert "separators" not in side
    gaze_cfg = json.loads((out / GAZE_CONFIG_FILE).read_text())
    assert gaze_cfg["mode"] == "add" and gaze_cfg["predictor"] == FAKE
    assert gaze_cfg["feature_scale"] == [1.0, 1.0]

    # GRPO with the GazeReward model as its reward: completions are scored with gaze.
    from jaxpost.train.grpo import train as grpo_train
    from tests.train.test_grpo import _small_grpo
    spec = f"jaxpost.rl.reward_model:from_workdir(workdir={str(workdir)!r}, batch_size=8)"
    grpo = _small_grpo(tmp_path / "grpo", steps=2, checkpoint_every=0,
                       reward_fns=(spec,), reward_weights=(1.0,))
    grpo_train(grpo)
    lines = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert all(np.isfinite(x["rewards/from_workdir/mean"]) for x in lines)
    assert lines[0]["rewards/from_workdir/std"] > 0  # the scores differ between completions


@pytest.mark.slow
def test_gaze_concat_trains_its_separators_and_projector(tmp_path):
    data_path = str(tmp_path / "easy.jsonl")
    _easy_pairs(data_path, n=64)
    cfg = gaze_config(tmp_path / "run", data_path, mode="concat", steps=3)
    cfg.head.head_init_std = 0.02  # a non-zero head: the gaze params get gradient at step 1
    result = train(to_dataclass(RewardModelConfig, cfg))
    gaze = jax.device_get(result.state.params["gaze"])
    assert gaze["separators"].shape == (2, 32)
    metrics = read_metrics(tmp_path / "run")
    assert all(np.isfinite(m["loss"]) for m in metrics) and len(metrics) == 3
    model_cfg, params, metadata = rm.load_reward_model(str(tmp_path / "run"))
    start = init_gaze(rm.gaze_spec_of(metadata), model_cfg,
                            jax.random.fold_in(jax.random.key(0), 3))
    assert float(np.abs(np.asarray(params["gaze"]["separators"]) - start["separators"]).max()) > 0
