"""`python -m jaxpost.export`: merged LoRA export, PEFT adapter folders (base from
model.hf_path or written beside), reward models as *ForSequenceClassification, errors."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.checkpoint import Checkpointer
from jaxpost.export import BASE_SUBDIR, SCORE_BIAS_KEY, ExportError, export, export_run
from jaxpost.models import Transformer, from_hf, init_params, tiny, to_hf
from jaxpost.peft import lora
from jaxpost.peft.lora import LoraConfig
from jaxpost.tokenizer import load_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTE = load_tokenizer("byte")
LC = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))


# ----------------------------------------------------------------------------- helpers
def _base_params(cfg, seed=0):
    return jax.device_get(init_params(cfg, jax.random.key(seed)))


def _adapters(params, lc, seed=0, std=0.3):
    """Fresh adapters for `params` with a random (non-zero) B."""
    adapters = lora.init_adapters(params, lc, jax.random.key(seed))
    rng = np.random.RandomState(seed + 100)
    for path, layers in lora.lora_targets(params, lc).items():
        node = functools.reduce(lambda tree, k: tree[k], path[:-1], adapters)
        b = std * rng.standard_normal(node["lora_b"].shape).astype(np.float32)
        if layers is not None:
            b = b * layers[:, None, None]
        node["lora_b"] = b
    return jax.device_get(adapters)


def _metadata(cfg, lc=None, hf_path="", reward_model=False):
    model_cfg = lora.with_lora(cfg, lc) if lc is not None else cfg
    config = {"trainer": "reward_model" if reward_model else "sft",
              "model": {"hf_path": hf_path, "init_from": "", "init_step": 0},
              "data": {"tokenizer": "byte"}}
    if lc is not None:
        config["lora"] = dataclasses.asdict(lc)
    metadata = {"config": config, "model": dataclasses.asdict(model_cfg)}
    if reward_model:
        metadata["reward_model"] = {"backbone": "model", "head": "score",
                                    "pooling": "last_token"}
    return json.loads(json.dumps(metadata))  # as the checkpoint stores it (tuples -> lists)


def _write_run(workdir, trainable, frozen, metadata, step=3):
    state = {"step": np.int32(step), "trainable": trainable, "frozen": frozen,
             "opt_state": {"count": np.int32(step)}, "rng": jax.random.key(0)}
    with Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        ckpt.save(step, state, data_state={}, metadata=metadata)
    return str(workdir)


def _lora_run(tmp_path, cfg, lc=LC, hf_path="", train_norm=False):
    """A LoRA run: `trainable` the adapters (plus the final norm if `train_norm`), `frozen`
    the rest of the base. Returns (workdir, the run's params with adapters)."""
    base = _base_params(cfg)
    adapters = _adapters(base, lc)
    trainable, frozen = dict(adapters), dict(base)
    if train_norm:  # a base tensor trained by a `trainable` rule
        scale = np.asarray(frozen.pop("norm")["scale"])
        noise = 0.5 * np.random.RandomState(7).standard_normal(scale.shape)
        trainable["norm"] = {"scale": (scale + noise).astype(scale.dtype)}
    workdir = _write_run(tmp_path / "run", trainable, frozen, _metadata(cfg, lc, hf_path))
    trained = {**base, **({"norm": trainable["norm"]} if train_norm else {})}
    return workdir, lora.attach_adapters(trained, adapters)


def _tokens(b=2, t=10, seed=1):
    return np.random.RandomState(seed).randint(0, 256, (b, t)).astype(np.int32)


def _jax_logits(cfg, params, tokens):
    return np.asarray(jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))(
        params, jnp.asarray(tokens)))


def _causal_lm(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager").eval()


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


# ------------------------------------------------------------------------------ merged
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merged_export_of_a_lora_run_has_jaxposts_lora_logits(tmp_path, family):
    cfg = tiny(family)
    workdir, trained = _lora_run(tmp_path, cfg)
    assert export(workdir, str(tmp_path / "hf")) == 3
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert not any("lora" in k for k in config)
    _, loaded = from_hf(tmp_path / "hf")
    chex.assert_trees_all_close(loaded, lora.merge_adapters(trained, LC.scale), atol=0, rtol=0)
    tokens = _tokens()
    ours = _jax_logits(lora.with_lora(cfg, LC), trained, tokens)
    assert np.abs(ours - _jax_logits(cfg, lora.strip_adapters(trained), tokens)).max() > 1e-2
    np.testing.assert_allclose(_hf_logits(_causal_lm(tmp_path / "hf"), tokens), ours,
                               atol=1e-4, rtol=0)


# -------------------------------------------------------------------------------- PEFT
def test_peft_export_names_the_runs_hf_path_when_only_adapters_trained(tmp_path):
    cfg = tiny("qwen2")
    to_hf(cfg, _base_params(cfg), tmp_path / "hf_base")
    workdir, trained = _lora_run(tmp_path, cfg, hf_path=str(tmp_path / "hf_base"))
    result = export_run(workdir, str(tmp_path / "adapter"), peft=True)
    assert (result.kind, result.step) == ("peft", 3)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.abspath(tmp_path / "hf_base")
    assert config["r"] == 4 and config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert not (tmp_path / "adapter" / BASE_SUBDIR).exists()
    export(workdir, str(tmp_path / "merged"))

    tokens = _tokens()
    model = peft.PeftModel.from_pretrained(
        _causal_lm(config["base_model_name_or_path"]), tmp_path / "adapter").eval()
    merged = _hf_logits(_causal_lm(tmp_path / "merged"), tokens)
    np.testing.assert_allclose(_hf_logits(model, tokens), merged, atol=1e-4, rtol=0)
    np.testing.assert_allclose(merged, _jax_logits(lora.with_lora(cfg, LC), trained, tokens),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["trained_norm", "random_init"])
def test_peft_export_writes_the_base_beside_the_adapter(tmp_path, case):
    cfg = tiny("llama")
    original = tmp_path / "hf_base"
    to_hf(cfg, _base_params(cfg), original)
    workdir, trained = _lora_run(
        tmp_path, cfg, hf_path=str(original) if case == "trained_norm" else "",
        train_norm=case == "trained_norm")
    out = tmp_path / "adapter"
    result = export_run(workdir, str(out), peft=True)
    base = os.path.abspath(out / BASE_SUBDIR)
    assert result.base == base
    assert json.loads((out / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == base
    _, written = from_hf(base)
    chex.assert_trees_all_close(written, lora.strip_adapters(trained), atol=0, rtol=0)
    export(workdir, str(tmp_path / "merged"))

    tokens = _tokens()
    model = peft.PeftModel.from_pretrained(_causal_lm(base), out).eval()
    merged = _hf_logits(_causal_lm(tmp_path / "merged"), tokens)
    np.testing.assert_allclose(_hf_logits(model, tokens), merged, atol=1e-4, rtol=0)
    np.testing.assert_allclose(merged, _jax_logits(lora.with_lora(cfg, LC), trained, tokens),
                               atol=1e-4, rtol=0)
    if case == "trained_norm":  # the hf_path base would have given another model
        wrong = peft.PeftModel.from_pretrained(_causal_lm(original), out).eval()
        assert np.abs(_hf_logits(wrong, tokens) - merged).max() > 1e-2


def test_peft_export_falls_back_to_a_base_beside_when_hf_path_is_gone(tmp_path, capsys):
    cfg = tiny("llama")
    workdir, _ = _lora_run(tmp_path, cfg, hf_path=str(tmp_path / "deleted"))
    result = export_run(workdir, str(tmp_path / "adapter"), peft=True)
    assert result.base == os.path.abspath(tmp_path / "adapter" / BASE_SUBDIR)
    assert "deleted" in capsys.readouterr().err


def test_peft_without_adapters_is_an_error_naming_the_run(tmp_path):
    cfg = tiny("llama")
    workdir = _write_run(tmp_path / "run", _base_params(cfg), {}, _metadata(cfg))
    with pytest.raises(ExportError, match=r"run \(step 3\): --peft: the run has no LoRA "
                                          r"adapters.*export it merged, without --peft"):
        export(workdir, str(tmp_path / "out"), peft=True)
    assert not (tmp_path / "out").exists()


def test_peft_rejects_a_lora_section_that_disagrees_with_the_trained_scale(tmp_path):
    cfg = tiny("llama")
    base = _base_params(cfg)
    metadata = _metadata(cfg, LC)
    metadata["config"]["lora"]["alpha"] = 16  # the model trained with alpha 8
    workdir = _write_run(tmp_path / "run", _adapters(base, LC), base, metadata)
    with pytest.raises(ExportError, match="scale 4.0, but the model trained with lora_scale=2.0"):
        export(workdir, str(tmp_path / "out"), peft=True)


# ------------------------------------------------------------------------ reward model
@pytest.mark.parametrize("case", ["plain", "lora", "sharded"])
def test_reward_model_exports_as_sequence_classification(tmp_path, capsys, monkeypatch, case):
    from jaxpost import export as export_module
    from jaxpost.data.preference import pad_sequences
    from jaxpost.rl.reward_model import reward_scores

    with_lora = case == "lora"
    if case == "sharded":  # the backbone in several files: the head joins their index
        monkeypatch.setattr(export_module, "to_hf",
                            functools.partial(to_hf, max_shard_size_bytes=100_000))

    cfg = tiny("llama", vocab_size=BYTE.vocab_size)  # byte ids + specials (pad 256)
    rng = np.random.RandomState(3)
    head = {"kernel": (0.3 * rng.standard_normal((cfg.hidden_size, 1))).astype(np.float32),
            "bias": np.asarray([0.75], np.float32)}
    params = {"model": _base_params(cfg), "score": head}
    lc = LoraConfig(rank=4, alpha=8, targets=("q_proj",)) if with_lora else None
    if with_lora:
        trainable = {"model": _adapters(params["model"], lc), "score": head}
        frozen = {"model": params["model"]}
        params = {"model": lora.attach_adapters(params["model"], trainable["model"]),
                  "score": head}
    else:
        trainable, frozen = params, {}
    workdir = _write_run(tmp_path / "rm", trainable, frozen,
                         _metadata(cfg, lc, reward_model=True))
    with pytest.raises(ExportError, match="reward model.*merged only"):
        export(workdir, str(tmp_path / "peft"), peft=True)
    result = export_run(workdir, str(tmp_path / "hf"))
    assert result.kind == "reward_model"
    assert "0.75" in capsys.readouterr().err and result.warnings

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["pad_token_id"] == BYTE.pad_id and config[SCORE_BIAS_KEY] == 0.75
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "hf", attn_implementation="eager").eval()
    assert model.config.num_labels == 1
    files = sorted(f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors"))
    assert len(files) > (2 if case == "sharded" else 1) and "model.safetensors" not in files

    seqs = [rng.randint(0, 256, n).tolist() for n in (5, 12, 9)]
    tokens, seg, _ = pad_sequences(seqs, 12, BYTE.pad_id)  # right-padded
    model_cfg = lora.with_lora(cfg, lc) if with_lora else cfg
    ours = np.asarray(reward_scores(model_cfg, params, jnp.asarray(tokens), jnp.asarray(seg)))
    if with_lora:  # the adapters matter
        plain = {"model": lora.strip_adapters(params["model"]), "score": head}
        assert np.abs(ours - np.asarray(reward_scores(cfg, plain, jnp.asarray(tokens),
                                                      jnp.asarray(seg)))).max() > 1e-3
    with torch.no_grad():
        ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
        masked = model(ids, attention_mask=torch.tensor(np.asarray(seg) != 0)).logits[:, 0]
        unmasked = model(ids).logits[:, 0]
    np.testing.assert_allclose(masked.numpy(), ours - 0.75, atol=1e-4, rtol=0)
    np.testing.assert_allclose(unmasked.numpy(), ours - 0.75, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxpost.export", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_exports_merged_and_fails_with_one_line_and_status_2(tmp_path):
    cfg = tiny("llama")
    workdir, trained = _lora_run(tmp_path, cfg)
    proc = _cli(f"--workdir={workdir}", f"--out={tmp_path / 'hf'}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {"exported_step": 3, "out": str(tmp_path / "hf"), "kind": "merged"}
    _, loaded = from_hf(tmp_path / "hf")
    chex.assert_trees_all_close(loaded, lora.merge_adapters(trained, LC.scale), atol=0, rtol=0)

    proc = _cli(f"--workdir={workdir}", f"--out={tmp_path / 'x'}", "--step=7", "--peft")
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and workdir in error[0] and "step 7" in error[0], proc.stderr


# ------------------------------------------------------------------- with the trainer
@pytest.mark.slow
def test_a_trained_lora_run_exports_merged_and_as_peft(tmp_path):
    """`python -m jaxpost.train` with LoRA (random init: the base is written beside)."""
    from jaxpost.checkpoint import open_run

    workdir = str(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxpost.train", "--config=configs/sft_demo.py",
         f"--config.workdir={workdir}", "--config.steps=2", "--config.lora.rank=4",
         "--config.lora.targets=('q_proj','v_proj')", "--config.eval_every=0",
         "--config.model.num_layers=1", "--config.data.seq_len=32",
         "--config.data.batch_size=8", "--config.data.num_records=200"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = export_run(workdir, str(tmp_path / "adapter"), peft=True)
    assert result.base == os.path.abspath(tmp_path / "adapter" / BASE_SUBDIR)
    assert export(workdir, str(tmp_path / "merged")) == result.step == 2

    with open_run(workdir) as run:
        run_cfg, params = run.model_config(), jax.device_get(run.params())
        trainable = jax.device_get(run.state()["trainable"])
    assert run_cfg.lora_scale == 2.0 and lora.has_adapters(params)
    assert jax.tree.leaves(trainable) and not jax.tree.leaves(lora.strip_adapters(trainable))
    tokens = _tokens()
    ours = _jax_logits(run_cfg, params, tokens)
    base_logits = _jax_logits(run_cfg.replace(lora_scale=0.0), lora.strip_adapters(params), tokens)
    assert np.abs(ours - base_logits).max() > 1e-3  # two steps moved B enough to tell
    model = peft.PeftModel.from_pretrained(_causal_lm(result.base), tmp_path / "adapter").eval()
    merged = _hf_logits(_causal_lm(tmp_path / "merged"), tokens)
    np.testing.assert_allclose(merged, ours, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_hf_logits(model, tokens), ours, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ bad checkpoints
def test_export_refuses_nonfinite_params_naming_the_tensor_and_writes_nothing(tmp_path):
    cfg = tiny("llama")
    params = _base_params(cfg)
    workdir = _write_run(tmp_path / "run", params, {}, _metadata(cfg), step=2)
    bad = jax.tree.map(np.array, params)
    bad["lm_head"]["kernel"][0, :3] = [np.nan, np.inf, -np.inf]
    _write_run(workdir, bad, {}, _metadata(cfg), step=3)
    with pytest.raises(ExportError, match=r"run \(step 3\): refusing to export non-finite "
                                          r"parameters: lm_head/kernel: 3 of \d+ values are "
                                          r"NaN/inf; export another step with --step "
                                          r"\(checkpoints: \[2\]\)"):
        export(workdir, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    assert export(workdir, str(tmp_path / "hf"), step=2) == 2


# The abandoned reads of the unreadable step leave nothing behind either: no "Exception
# ignored ... Event loop is closed" from tensorstore's threads (`jaxpost.checkpoint`).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_export_without_a_step_falls_back_over_an_unreadable_latest_one(tmp_path):
    cfg = tiny("llama")
    params = _base_params(cfg)
    workdir = _write_run(tmp_path / "run", params, {}, _metadata(cfg), step=2)
    _write_run(workdir, _base_params(cfg, seed=1), {}, _metadata(cfg), step=3)
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "run" / "checkpoints" / "3")
             for f in fs if os.path.basename(d) == "d"]
    with open(max(files, key=os.path.getsize), "r+b") as f:
        f.truncate(100)  # a torn tensor file
    result = export_run(workdir, str(tmp_path / "hf"))
    assert result.step == 2 and len(result.warnings) == 1
    assert f"unreadable checkpoint {workdir}/checkpoints/3" in result.warnings[0]
    _, loaded = from_hf(tmp_path / "hf")
    chex.assert_trees_all_close(loaded, params, atol=0, rtol=0)
    with pytest.raises(ExportError, match=rf"\(step 3\): checkpoint {workdir}/checkpoints/3 is "
                                          r"unreadable \(ValueError: OUT_OF_RANGE.*other steps: \[2\]"):
        export(workdir, str(tmp_path / "hf3"), step=3)
    assert not (tmp_path / "hf3").exists()
