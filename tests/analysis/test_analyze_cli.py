"""`python -m jaxpost.analyze` and jaxpost/analysis/loading.py: specs, LoRA workdirs read
as merged weights, and the files the CLI writes for a workdir and HF folders."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxpost.analysis import loading
from jaxpost.checkpoint import Checkpointer
from jaxpost.models import tiny, to_hf
from jaxpost.peft import lora
from tests.analysis.analysis_testing import random_params
from tests.cli_testing import ROOT

CFG = tiny("llama", vocab_size=262, num_layers=2)  # the byte tokenizer's vocabulary


def _write_run(workdir, steps_params, model_cfg=CFG, split=None):
    """A workdir with one checkpoint per (step, params); `split(params)` -> (trainable,
    frozen) saves the split layout of a run that froze part of the model."""
    metadata = json.loads(json.dumps({
        "config": {"trainer": "sft", "data": {"tokenizer": "byte"}},
        "model": dataclasses.asdict(model_cfg)}))
    with Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        for step, params in steps_params:
            if split is None:
                state = {"step": np.int32(step), "params": params}
            else:
                trainable, frozen = split(params)
                state = {"step": np.int32(step), "trainable": trainable, "frozen": frozen}
            ckpt.save(step, state, data_state={}, metadata=metadata)
    return str(workdir)


def test_specs_resolve_latest_step_all_steps_and_hf_folders(tmp_path):
    base = random_params(CFG, 0)
    run = _write_run(tmp_path / "run", [(1, base), (2, base)])
    to_hf(CFG, base, tmp_path / "hf")
    assert [r.label for r in loading.resolve(run)] == ["run@2"]
    assert [r.label for r in loading.resolve(run + "@1")] == ["run@1"]
    assert [r.step for r in loading.resolve(run + "@all")] == [1, 2]
    assert [(r.kind, r.label) for r in loading.resolve(str(tmp_path / "hf"))] == [("hf", "hf")]
    with pytest.raises(FileNotFoundError, match="neither a jaxpost workdir"):
        loading.resolve(str(tmp_path))
    with pytest.raises(ValueError, match="DIR, DIR@STEP or DIR@all"):
        loading.resolve(run + "@latest")
    with pytest.raises(FileNotFoundError, match="available steps"):
        loading.resolve(run + "@7")


def test_a_lora_workdir_is_read_as_its_merged_weights(tmp_path):
    base = random_params(CFG, 0)
    lc = lora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "down_proj"))
    adapters = jax.device_get(lora.init_adapters(base, lc, jax.random.key(0)))
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), adapters)
    with_adapters = lora.attach_adapters(base, adapters)
    run = _write_run(tmp_path / "lora", [(5, with_adapters)], lora.with_lora(CFG, lc),
                     split=lambda p: (adapters, base))
    cfg, params, tokenizer = loading.load(loading.resolve(run)[0])
    assert tokenizer == "byte" and cfg.lora_scale == 0.0
    assert not lora.has_adapters(params)
    q = adapters["layers"]["self_attn"]["q_proj"]
    expected = base["layers"]["self_attn"]["q_proj"]["kernel"] + lc.scale * np.einsum(
        "lir,lro->lio", q["lora_a"], q["lora_b"])  # W + s·A·B per layer, by hand
    np.testing.assert_allclose(params["layers"]["self_attn"]["q_proj"]["kernel"], expected,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(params["layers"]["self_attn"]["k_proj"]["kernel"],
                                  base["layers"]["self_attn"]["k_proj"]["kernel"])


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # a subprocess: imports, the sampler, the KL pass, SVDs, plots (~12 s CPU)
def test_cli_writes_csvs_pngs_and_summary_for_a_workdir_and_an_hf_folder(tmp_path):
    import matplotlib.image

    base = random_params(CFG, 0)
    noise = random_params(CFG, 1, zero_biases=False)
    step1 = jax.tree.map(lambda x, n: x + 0.1 * n, base, noise)
    step2 = jax.tree.map(lambda x, n: x + 0.3 * n, base, noise)
    step2["layers"]["mlp"]["up_proj"]["kernel"] = (
        base["layers"]["mlp"]["up_proj"]["kernel"] * 1.01)
    run = _write_run(tmp_path / "run", [(1, step1), (2, step2)])
    to_hf(CFG, base, tmp_path / "base_hf")
    to_hf(CFG, step1, tmp_path / "tuned_hf")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxpost.analyze", f"--base={tmp_path / 'base_hf'}",
         f"--checkpoints={run}@all,{tmp_path / 'tuned_hf'}", f"--out={out}",
         "--probe_samples=4", "--probe_tokens=6", "--batch_size=4", "--intruder_k=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["checkpoints"] == ["run@1", "run@2", "tuned_hf"]

    rows = _read_csv(out / "weight_change.csv")
    assert {"checkpoint", "layer", "module", "abs", "rel", "rms"} <= set(rows[0])
    per_ckpt = 9 * CFG.num_layers + 3  # 9 tensors per layer + embed_tokens, norm, lm_head
    assert len(rows) == 3 * per_ckpt
    up = {(r["checkpoint"], r["layer"]): r for r in rows if r["module"] == "up_proj"}
    np.testing.assert_allclose(float(up["run@2", "1"]["rel"]), 0.01, rtol=1e-4)
    outside = [r for r in rows if r["layer"] == ""]
    assert sorted({r["module"] for r in outside}) == ["embed_tokens", "lm_head", "norm"]
    # The HF checkpoint holds the same weights as step 1 of the workdir.
    hf_rows = {(r["layer"], r["module"]): float(r["abs"]) for r in rows
               if r["checkpoint"] == "tuned_hf"}
    for r in rows:
        if r["checkpoint"] == "run@1":
            np.testing.assert_allclose(hf_rows[r["layer"], r["module"]], float(r["abs"]),
                                       rtol=1e-5)

    kl = _read_csv(out / "kl.csv")
    assert [r["checkpoint"] for r in kl] == ["run@1", "run@2", "tuned_hf"]
    kls = [float(r["kl_mean"]) for r in kl]
    assert 0 < kls[0] < kls[1] and kls[2] == pytest.approx(kls[0], rel=1e-4)
    intr = _read_csv(out / "intruders.csv")
    assert len(intr) == 3 * 7 * CFG.num_layers * 3  # checkpoints x matrices x layers x eps
    assert all(0 <= int(r["count"]) <= 4 for r in intr)

    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs == ["heatmap_rel_run_2.png", "heatmap_rel_tuned_hf.png", "intruders.png",
                    "kl.png", "trajectory_rel.png"]
    for name in pngs:
        image = matplotlib.image.imread(out / name)  # decodes, or raises
        assert image.shape[:2] == (500, 900), name
        assert float(image[..., :3].std()) > 0.01, name  # not blank
    summary = (out / "summary.md").read_text()
    for name in pngs:
        assert f"]({name})" in summary
    assert "The largest single change is layer" in summary
    assert "up_proj" in summary and "run@2" in summary


@pytest.mark.slow  # a subprocess (~4 s CPU of imports)
def test_cli_errors_are_one_line_with_status_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxpost.analyze", f"--base={tmp_path}",
         f"--checkpoints={tmp_path}", f"--out={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "neither a jaxpost workdir" in proc.stderr
