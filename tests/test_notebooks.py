"""The Colab notebooks (colab/*.ipynb): generated from colab/make_notebooks.py, and each
runs headless on CPU with tiny parameters to its final metric cell (slow)."""

import importlib.util
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")

#: A ~10k-parameter Llama (the byte tokenizer's vocabulary) on one CPU device.
TINY_MODEL = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1,
              "model.num_heads": 2, "model.num_kv_heads": 1, "model.head_dim": 16,
              "mesh.num_devices": 1, "log_every": 1, "optimizer.warmup_steps": 0}
TINY_SFT = {"data.batch_size": 4, "data.num_records": 32}
TINY_GRPO = {"grpo.num_generations": 2, "grpo.prompts_per_step": 2, "prompts.num_records": 32,
             "eval.num_samples": 1}

#: Per notebook: the parameters injected after its `parameters` cell (as papermill does),
#: and the metric its last cell prints.
CASES = {
    "sft": ({"STEPS": 2, "EVAL_PROMPTS": 4, "OVERRIDES": {**TINY_MODEL, **TINY_SFT}},
            "eval_accuracy"),
    "grpo": ({"SFT_STEPS": 2, "STEPS": 2, "EVAL_PROMPTS": 4, "OVERRIDES": TINY_MODEL,
              "SFT_OVERRIDES": TINY_SFT, "GRPO_OVERRIDES": TINY_GRPO}, "eval_accuracy"),
    "grpo_gaze": ({"SEEDS": "0", "STEPS": 2, "SFT_STEPS": 2, "WINDOW": 1}, "final_reward"),
    "alignguard": ({"ARMS": ("lora", "agl"), "PROMPTS_PER_CATEGORY": 1, "TASK_PROMPTS": 4,
                    "MAX_NEW_TOKENS": 4,
                    "OVERRIDES": {**TINY_MODEL, **TINY_SFT, "steps": 2,
                                  "checkpoint_every": 0, "eval_every": 0,
                                  "eval_at_start": False, "data.eval_batches": 0}},
                   "refusal_drop"),
    "rl_vs_sft": ({"PRETRAIN_STEPS": 2, "ARM_STEPS": 2, "CHECKPOINT_EVERY": 1,
                   "OVERRIDES": {**TINY_MODEL, "eval_every": 0}, "SFT_OVERRIDES": TINY_SFT,
                   "GRPO_OVERRIDES": TINY_GRPO}, "relative_weight_change"),
}


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_notebooks", os.path.join(COLAB, "make_notebooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(name):
    return nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)


def _parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", ())]
    assert len(tagged) == 1, f"{len(tagged)} cells tagged `parameters`"
    return tagged[0]


def test_the_committed_notebooks_are_the_generators_output_with_one_parameters_cell():
    gen = _generator()
    assert sorted(gen.NOTEBOOKS) == sorted(CASES)
    on_disk = sorted(f[:-6] for f in os.listdir(COLAB) if f.endswith(".ipynb"))
    assert on_disk == sorted(CASES), "run `python colab/make_notebooks.py`"
    for name in CASES:
        nb, want = _read(name), gen.build(name)
        nbformat.validate(nb)
        assert [(c.cell_type, c.source) for c in nb.cells] == \
               [(c.cell_type, c.source) for c in want.cells], \
            f"colab/{name}.ipynb differs from make_notebooks.py: rerun it"
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
        params = nb.cells[_parameters_index(nb)].source
        for key in CASES[name][0]:  # the tests' tiny parameters name real parameters
            assert re.search(rf"^{key} = ", params, re.MULTILINE), (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs_headless_on_cpu_to_its_final_metric(name, tmp_path):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    params, metric = CASES[name]
    nb = _read(name)
    at = _parameters_index(nb)
    injected = "\n".join(f"{k} = {v!r}" for k, v in
                         {**params, "WORKDIR": str(tmp_path / "work")}.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        "# injected by tests/test_notebooks.py\n" + injected))
    env = os.environ.copy()
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = ""  # one CPU device, as on a Colab CPU runtime
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": COLAB}})
    client.execute(env=env)  # raises CellExecutionError on a failing cell
    errors = [o for c in nb.cells for o in c.get("outputs", ()) if o.output_type == "error"]
    assert not errors, errors
    last = nb.cells[-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    assert re.search(rf"{metric} = -?\d+\.\d+", text), text
    images = [o for c in nb.cells for o in c.get("outputs", ())
              if "image/png" in o.get("data", {})]
    assert images, "no inline plot"


@pytest.mark.parametrize("env, requirements", [
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-1"}, "requirements-tpu.txt"),
    ({}, "requirements.txt")])
def test_setup_cell_outside_a_checkout_clones_and_installs_for_the_runtime(
        env, requirements, tmp_path, monkeypatch):
    import shutil
    import subprocess
    import sys

    gen = _generator()
    calls, chdirs = [], []
    monkeypatch.chdir(tmp_path)  # no checkout at or above it
    for key in ("TPU_ACCELERATOR_TYPE", "COLAB_TPU_ADDR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(os, "chdir", chdirs.append)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no nvidia-smi
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(compile(gen.SETUP, "setup-cell", "exec"), {})  # noqa: S102 (the cell, as a kernel runs it)
    root = "/content/jaxpost"
    assert calls == [
        ["git", "clone", "--depth=1", gen.REPO_URL, root],
        [sys.executable, "-m", "pip", "install", "-q", "-r", os.path.join(root, requirements)]]
    assert chdirs == [root] and sys.path[0] == root
