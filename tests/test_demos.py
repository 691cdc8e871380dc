"""The shipped recipes do what their docstrings promise (slow: minutes on 2 CPU cores)."""

import importlib.util
import os

import pytest

from jaxpost.train.__main__ import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Held-out exact match the SFT demo must reach (chance is about 1/150 for 2-digit sums).
SFT_ACCURACY_BAR = 0.3


def recipe(name, workdir, **overrides):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.workdir = str(workdir)
    cfg.mesh.num_devices = 1  # the demos run on one CPU device, as on a laptop
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return load_config(cfg)


@pytest.fixture(scope="module")
def sft_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft_demo")
    cfg, train = recipe("sft_demo", workdir)
    return workdir, train(cfg)


@pytest.mark.slow
def test_sft_demo_reaches_its_heldout_accuracy_bar(sft_demo):
    _, result = sft_demo
    assert result.eval_metrics["eval_accuracy"] >= SFT_ACCURACY_BAR, result.eval_metrics


@pytest.mark.slow
def test_grpo_demo_improves_heldout_accuracy_over_its_sft_start(sft_demo, tmp_path):
    sft_workdir, _ = sft_demo
    # The recipe's own start: the SFT demo's step-400 checkpoint (model.init_step).
    cfg, train = recipe("grpo_demo", tmp_path, **{"model.init_from": str(sft_workdir)})
    assert cfg.model.init_step == 400
    result = train(cfg)
    start = result.start_eval_metrics["eval_accuracy"]  # the SFT params, same prompts and rng
    assert result.eval_metrics["eval_accuracy"] > start, (start, result.eval_metrics)
