"""`python -m jaxpost.export --workdir=DIR --out=PATH [--step=N] [--peft]`: a checkpoint's
model as a Hugging Face folder that `transformers` (or PEFT) loads.

Three outputs, picked by the run and `--peft`:

- Merged (default, language models): config.json + safetensors of
  `*ForCausalLM`. A LoRA run's adapters are folded into their kernels (`W + s·A·B`, `s`
  the run's `ModelConfig.lora_scale`), so the folder is a plain model.
- PEFT (`--peft`, LoRA runs): `PATH/adapter_config.json` + `adapter_model.safetensors`
  (`jaxpost.peft.lora.save_peft_adapter`) whose `base_model_name_or_path` is an absolute
  path to a base folder that `transformers` loads, so that base + adapter is the trained
  model: the run's `model.hf_path` when the run trained nothing but the adapters (its
  saved `trainable` tree holds adapter leaves only), otherwise (random init,
  `model.init_from`, or base tensors trained by `trainable`/`freeze` rules) the run's
  current params with the adapters stripped, written to `PATH/base`.
- Reward models (runs of the `reward_model` trainer, params `{"model", "score"}`): a
  `*ForSequenceClassification` folder (`num_labels` 1, `score.weight` = the head's kernel
  transposed, `pad_token_id` = the run's tokenizer's pad id, so Hugging Face pools the last
  non-pad token as `jaxpost.rl.reward_model.reward_scores` does on right-padded rows). HF's
  score Linear has no bias: the head's bias, a constant shift that pairwise
  (Bradley–Terry) comparisons cannot see, is stored in config.json as `jaxpost_score_bias`
  (HF logits + that bias = jaxpost's scores), with a warning when it is non-zero. LoRA
  reward models are exported merged only. The backbone's `lm_head`, which a reward model
  keeps but never uses, is not written.
  A GazeReward model (`reward_model.gaze` in the metadata; `jaxpost.rl.gaze_reward`)
  also gets a sidecar that `transformers` does not read: `gaze_projector.safetensors`
  (the projector in PyTorch layout, `fc1.weight` [128, k], `fc2.weight` [hidden, 128],
  `norm1`/`norm2` weight and bias, and for GazeConcat `separators` [2, hidden], the
  `<eye/>`/`</eye>` rows, ids vocab_size and vocab_size + 1 of a table resized by two) and
  `gaze_config.json` (mode, features, their scale, the predictor spec, dropout, LayerNorm
  epsilon, separator ids). The HF folder alone is the trunk: it scores text *without*
  gaze, which is not what was trained (a warning says so); scoring as trained means
  feeding `inputs_embeds` = token embeddings + projector(features) (GazeAdd) or the
  concatenated sequence (GazeConcat), as `jaxpost.rl.gaze_reward.gaze_inputs` does.
- PPO runs (params `{"model": policy, "score": value head}` or with a separate
  `"critic"`): the policy, merged or `--peft` as above; the value model is not exported.

Errors (no checkpoint, `--peft` without adapters, ...) exit with status 2 and one line
naming the workdir and step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from jaxpost.checkpoint import model_config_from_metadata, open_run, params_from_state
from jaxpost.models import ModelConfig, to_hf
from jaxpost.models.hf import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    write_safetensors,
)
from jaxpost.peft import lora

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Folder to write the Hugging Face model to.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PEFT = flags.DEFINE_bool(
    "peft", False, "Write a PEFT LoRA adapter folder (plus a base folder where needed) "
    "instead of the merged model.")

__all__ = [
    "BASE_SUBDIR",
    "GAZE_CONFIG_FILE",
    "GAZE_WEIGHTS_FILE",
    "SCORE_BIAS_KEY",
    "ExportError",
    "export",
    "export_run",
    "model_config_from_metadata",
]

BASE_SUBDIR = "base"  # PATH/base: the base model a --peft export writes beside its adapter
SCORE_BIAS_KEY = "jaxpost_score_bias"  # config.json key of a reward head's bias
GAZE_WEIGHTS_FILE = "gaze_projector.safetensors"  # a GazeReward model's projector (sidecar)
GAZE_CONFIG_FILE = "gaze_config.json"  # ... and how to apply it


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked (the message names workdir and step)."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export_run` wrote."""

    step: int  # the checkpoint step
    out: str  # the folder written
    kind: str  # "merged", "peft" or "reward_model"
    base: str | None = None  # --peft: base_model_name_or_path (absolute)
    warnings: tuple[str, ...] = ()


def export(workdir: str, out: str, step: int | None = None, peft: bool = False) -> int:
    """Writes the model of `workdir`'s checkpoint `step` (default: the latest) to `out`.

    Args:
      workdir: a training workdir (holds `checkpoints/`).
      out: the folder to write (created if needed).
      step: the checkpoint step; None for the latest.
      peft: write a PEFT adapter folder instead of the merged model (LoRA runs only).

    Returns:
      The exported step.

    Raises:
      FileNotFoundError: no such checkpoint (naming the folder and its steps).
      ExportError: the checkpoint cannot be exported as asked (`--peft` on a run without
        adapters or on a reward model, adapters without a LoRA scale, ...).
    """
    return export_run(workdir, out, step, peft).step


def _warn(message: str, warnings: list[str]) -> None:
    warnings.append(message)
    print(f"warning: {message}", file=sys.stderr)


def export_run(workdir: str, out: str, step: int | None = None,
               peft: bool = False) -> ExportResult:
    """`export`, returning what was written (`ExportResult`)."""
    out = os.fspath(out)
    with open_run(workdir, step) as run:
        step = run.step
        where = f"{os.fspath(workdir)} (step {step})"

        def fail(message: str) -> ExportError:
            return ExportError(f"{where}: {message}")

        warnings: list[str] = []
        try:
            # The state first: opened without --step, it falls back over unreadable
            # steps, and the metadata must then be the step that was read.
            state = run.state()
            step = run.step
            where = f"{os.fspath(workdir)} (step {step})"
            metadata = run.metadata()
            cfg = model_config_from_metadata(metadata, where=str(run.directory))
            params = params_from_state(state)
        except ValueError as e:
            raise fail(str(e)) from None
        for bad, why in run.skipped:
            _warn(f"skipped the unreadable checkpoint {run.directory / str(bad)} ({why}); "
                  f"exporting step {step}", warnings)
        trainable = state.get("trainable") if "params" not in state else None
        params = jax.device_get(params)
        trainable = jax.device_get(trainable)
        nonfinite = _nonfinite_tensors(params)
        if nonfinite:
            others = [s for s in run.all_steps() if s != step]
            raise fail(f"refusing to export non-finite parameters: {'; '.join(nonfinite)}; "
                       f"export another step with --step (checkpoints: {others})")
    if "ppo" in metadata:  # a PPO run: export its policy; the value head stays behind
        params = params[metadata["ppo"]["policy"]]
        trainable = (trainable or {}).get(metadata["ppo"]["policy"])
    adapters = lora.has_adapters(params)
    plain_cfg = cfg.replace(lora_scale=0.0, lora_dropout=0.0)

    def merged(tree: Mapping) -> Mapping:
        if not adapters:
            return tree
        if cfg.lora_scale == 0.0:
            raise fail("the params hold LoRA adapters but the run's ModelConfig.lora_scale "
                       "is 0, so they cannot be merged; the metadata does not describe "
                       "these params")
        return lora.merge_adapters(tree, cfg.lora_scale)

    try:
        if "reward_model" in metadata:
            if peft:
                raise fail("--peft: this is a reward model; PEFT's CAUSAL_LM adapter has no "
                           "score head, so reward models export merged only (drop --peft)")
            _write_reward_model(plain_cfg, merged(params), metadata, out, fail, warnings)
            return ExportResult(step, out, "reward_model", warnings=tuple(warnings))
        if not peft:
            to_hf(plain_cfg, merged(params), out)
            return ExportResult(step, out, "merged", warnings=tuple(warnings))
        if not adapters:
            raise fail("--peft: the run has no LoRA adapters (no lora_a/lora_b params); "
                       "export it merged, without --peft")
        base = _write_peft(cfg, plain_cfg, params, trainable, metadata, out, fail, warnings)
        return ExportResult(step, out, "peft", base=base, warnings=tuple(warnings))
    except ExportError:
        raise
    except ValueError as e:  # LoraError, HFCheckpointError, to_hf's structure errors
        raise fail(str(e)) from None


def _nonfinite_tensors(params: Any, limit: int = 5) -> list[str]:
    """`name: k of n values are NaN/inf` for (up to `limit`) floating tensors of `params`
    that hold a non-finite value."""
    out = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        x = np.asarray(x)
        if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
            continue
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x.astype(np.float32))))
        if bad:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            out.append(f"{name}: {bad} of {x.size} values are NaN/inf")
    if len(out) > limit:
        out = out[:limit] + [f"and {len(out) - limit} more tensors"]
    return out


# ------------------------------------------------------------------------------ PEFT
def _only_adapter_leaves(tree: Any) -> bool:
    """Whether every leaf of a (possibly empty) nested-dict tree is lora_a/lora_b."""
    if not isinstance(tree, Mapping):
        return tree is None
    return all(lora.is_adapter_leaf(k) or _only_adapter_leaves(v)
               for k, v in tree.items())


def _lora_config(metadata: Mapping, cfg: ModelConfig, fail) -> lora.LoraConfig:
    section = (metadata.get("config") or {}).get("lora")
    if not section:
        raise fail("--peft: the run's metadata has no config.lora section (rank, alpha, "
                   "targets, ...), which the adapter_config.json needs; export it merged, "
                   "without --peft")
    section = dict(section)
    section["targets"] = tuple(section.get("targets") or ())
    lc = lora.LoraConfig(**section)
    if not lc.enabled:
        raise fail("--peft: the run's config.lora.rank is 0 but its params hold adapters; "
                   "export it merged, without --peft")
    if not np.isclose(lc.scale, cfg.lora_scale, rtol=1e-6, atol=0):
        raise fail(f"--peft: config.lora (alpha={lc.alpha}, rank={lc.rank}, "
                   f"rslora={lc.rslora}) gives the scale {lc.scale}, but the model trained "
                   f"with lora_scale={cfg.lora_scale}; PEFT would apply a different scale")
    return lc


def _write_peft(cfg: ModelConfig, plain_cfg: ModelConfig, params: Mapping, trainable: Any,
                metadata: Mapping, out: str, fail, warnings: list[str]) -> str:
    lc = _lora_config(metadata, cfg, fail)
    model_section = (metadata.get("config") or {}).get("model") or {}
    hf_path = model_section.get("hf_path") or ""
    base = None
    # The trainers load model.hf_path when it is set (it wins over init_from); its weights
    # are the run's base exactly when no base tensor trained.
    if hf_path and trainable is not None and _only_adapter_leaves(trainable):
        problem = _base_folder_problem(hf_path, cfg)
        if problem is None:
            base = os.path.abspath(hf_path)
            _check_base_dtype(base, cfg, warnings)
        else:
            _warn(f"the run's model.hf_path {hf_path!r} {problem}; writing the base model "
                  f"beside the adapter instead", warnings)
    if base is None:
        base = os.path.abspath(os.path.join(out, BASE_SUBDIR))
        to_hf(plain_cfg, lora.strip_adapters(params), base)
    lora.save_peft_adapter(plain_cfg, lc, params, out, base)
    return base


_SHAPE_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim", "tie_embeddings", "attention_bias",
                 "qk_norm")


def _base_folder_problem(hf_path: str, cfg: ModelConfig) -> str | None:
    """Why `hf_path` cannot serve as the adapter's base (None: it can)."""
    config_path = os.path.join(hf_path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        return f"has no {CONFIG_FILE} here"
    try:
        with open(config_path) as f:
            there = ModelConfig.from_hf_config(json.load(f))
    except (OSError, ValueError) as e:
        return f"has an unreadable {CONFIG_FILE} ({e})"
    differ = [k for k in _SHAPE_FIELDS if getattr(there, k) != getattr(cfg, k)]
    if differ:
        return ("describes another model (" + ", ".join(
            f"{k}={getattr(there, k)} vs the run's {getattr(cfg, k)}" for k in differ) + ")")
    return None


def _check_base_dtype(base: str, cfg: ModelConfig, warnings: list[str]) -> None:
    with open(os.path.join(base, CONFIG_FILE)) as f:
        hf = json.load(f)
    stored = hf.get("torch_dtype") or hf.get("dtype")
    if stored and stored != cfg.param_dtype:
        _warn(f"the base folder {base} stores {stored} weights but the run kept its base in "
              f"{cfg.param_dtype}; base + adapter equals the trained model up to that cast",
              warnings)


# ---------------------------------------------------------------------- reward models
def _safetensors_names(path: str) -> list[str]:
    """Tensor names in one safetensors file (reads its header only)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return [k for k in header if k != "__metadata__"]


def _write_reward_model(cfg: ModelConfig, params: Mapping, metadata: Mapping, out: str,
                        fail, warnings: list[str]) -> None:
    from jaxpost.tokenizer import load_tokenizer

    info = metadata["reward_model"] or {}
    backbone_key, head_key = info.get("backbone", "model"), info.get("head", "score")
    pooling = info.get("pooling", "last_token")
    if pooling != "last_token":
        raise fail(f"reward_model.pooling={pooling!r}: Hugging Face's sequence "
                   "classification pools the last non-pad token only")
    if backbone_key not in params or head_key not in params:
        raise fail(f"reward-model params hold {sorted(params)}; expected {backbone_key!r} "
                   f"and {head_key!r}")
    head = params[head_key]
    kernel = np.asarray(head["kernel"])
    bias = np.asarray(head.get("bias", np.zeros((1,), kernel.dtype)))
    if kernel.shape != (cfg.hidden_size, 1) or bias.shape != (1,):
        raise fail(f"the score head has kernel {kernel.shape} and bias {bias.shape}; "
                   f"expected ({cfg.hidden_size}, 1) and (1,)")

    spec = ((metadata.get("config") or {}).get("data") or {}).get("tokenizer") or "byte"
    try:
        tokenizer = load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise fail(f"cannot load the run's tokenizer {spec!r} for the pad id "
                   f"(config.json's pad_token_id): {e}") from None
    pad_id = int(tokenizer.pad_id)
    if tokenizer.eos_id is not None and int(tokenizer.eos_id) == pad_id:
        _warn(f"the tokenizer {spec!r} pads with its EOS id {pad_id}: Hugging Face pools the "
              "last token that is not pad_token_id, i.e. the one before a final EOS, while "
              "jaxpost scores the EOS itself; scores of EOS-terminated rows will differ",
              warnings)

    # The backbone without lm_head (unused by a reward model): the tied layout has none.
    backbone = {k: v for k, v in params[backbone_key].items() if k != "lm_head"}
    to_hf(cfg.replace(tie_embeddings=True), backbone, out)
    if jax.process_index() != 0:
        return
    # transformers reads model.safetensors before an index, so the score head needs the
    # sharded layout: the backbone's files renamed model-0000i-of-{n+1}, the head last.
    index_path = os.path.join(out, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = [SINGLE_FILE]
        names = _safetensors_names(os.path.join(out, SINGLE_FILE))
        weight_map = {name: SINGLE_FILE for name in names}
    n = len(files) + 1
    renamed = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(files)}
    for old, new in renamed.items():
        os.replace(os.path.join(out, old), os.path.join(out, new))
    score_file = f"model-{n:05d}-of-{n:05d}.safetensors"
    write_safetensors(os.path.join(out, score_file),
                      {"score.weight": np.ascontiguousarray(kernel.T)})
    weight_map = {name: renamed[f] for name, f in weight_map.items()}
    weight_map["score.weight"] = score_file
    total = sum(os.path.getsize(os.path.join(out, f)) for f in renamed.values())
    with open(index_path, "w") as f:
        json.dump({"metadata": {"total_size": total + kernel.nbytes},
                   "weight_map": dict(sorted(weight_map.items()))}, f, indent=2, sort_keys=True)
        f.write("\n")
    generation = os.path.join(out, GENERATION_CONFIG_FILE)
    if os.path.exists(generation):
        os.remove(generation)  # a classifier does not generate

    config_path = os.path.join(out, CONFIG_FILE)
    with open(config_path) as f:
        hf = json.load(f)
    hf["architectures"] = [a.replace("ForCausalLM", "ForSequenceClassification")
                           for a in hf["architectures"]]
    hf["tie_word_embeddings"] = cfg.tie_embeddings  # to_hf wrote the lm_head-free layout
    hf["id2label"] = {"0": "LABEL_0"}
    hf["label2id"] = {"LABEL_0": 0}
    hf["pad_token_id"] = pad_id
    b = float(bias[0])
    hf[SCORE_BIAS_KEY] = b
    with open(config_path, "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
    if b != 0.0:
        _warn(f"the reward head's bias {b:g} is not in the Hugging Face model (its score "
              f"Linear has no bias): HF logits + {b:g} = jaxpost's scores (differences and "
              f"Bradley–Terry probabilities are unchanged); the bias is stored in "
              f"{CONFIG_FILE} as {SCORE_BIAS_KEY!r}", warnings)
    gaze = info.get("gaze")
    if gaze:
        _write_gaze_sidecar(cfg, params, gaze, out, fail, warnings)


def _write_gaze_sidecar(cfg: ModelConfig, params: Mapping, gaze: Mapping, out: str, fail,
                        warnings: list[str]) -> None:
    """`gaze_projector.safetensors` + `gaze_config.json` of a GazeReward model."""
    from jaxpost.rl.gaze_reward import GAZE, LAYER_NORM_EPS

    if GAZE not in params or "projector" not in params[GAZE]:
        raise fail(f"the metadata describes a GazeReward model (mode {gaze.get('mode')!r}) "
                   f"but the params have no {GAZE!r}/projector entry")
    proj = params[GAZE]["projector"]
    tensors = {}
    for layer in ("fc1", "fc2"):
        tensors[f"{layer}.weight"] = np.ascontiguousarray(np.asarray(proj[layer]["kernel"]).T)
        tensors[f"{layer}.bias"] = np.asarray(proj[layer]["bias"])
    for norm in ("norm1", "norm2"):
        tensors[f"{norm}.weight"] = np.asarray(proj[norm]["scale"])
        tensors[f"{norm}.bias"] = np.asarray(proj[norm]["bias"])
    if "separators" in params[GAZE]:
        tensors["separators"] = np.asarray(params[GAZE]["separators"])
    write_safetensors(os.path.join(out, GAZE_WEIGHTS_FILE), tensors)
    config = {"mode": gaze["mode"], "features": list(gaze["features"]),
              "feature_scale": list(gaze.get("scale") or [1.0] * len(gaze["features"])),
              "predictor": gaze.get("predictor", ""), "width": int(gaze["width"]),
              "dropout": list(gaze["dropout"]), "layer_norm_eps": LAYER_NORM_EPS,
              "projector": "norm2(fc2(relu(norm1(fc1(features / feature_scale)))))",
              "injection": ("inputs_embeds = embed_tokens(input_ids) + projector(features) on "
                            "real tokens" if gaze["mode"] == "add" else
                            "inputs_embeds = [separators[0], projector(features of the n real "
                            "tokens), separators[1], embed_tokens(the n real tokens)], "
                            "positions 0..2n+1, score at the last text token"),
              "separator_ids": ([cfg.vocab_size, cfg.vocab_size + 1]
                                if gaze["mode"] == "concat" else [])}
    with open(os.path.join(out, GAZE_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    _warn(f"this is a GazeReward model ({gaze['mode']}): transformers loads its trunk only, "
          f"which scores text without gaze, not as trained; the projector is in "
          f"{GAZE_WEIGHTS_FILE} and how to apply it in {GAZE_CONFIG_FILE}", warnings)


# ------------------------------------------------------------------------------- CLI
def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if not _WORKDIR.value or not _OUT.value:
        raise app.UsageError("--workdir and --out are required", exitcode=2)
    try:
        result = export_run(_WORKDIR.value, _OUT.value, _STEP.value, peft=_PEFT.value)
    except (FileNotFoundError, ValueError) as e:
        message = " ".join(str(e).split())  # one line
        if _WORKDIR.value not in message:
            step = "latest step" if _STEP.value is None else f"step {_STEP.value}"
            message = f"{_WORKDIR.value} ({step}): {message}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    summary = {"exported_step": result.step, "out": result.out, "kind": result.kind}
    if result.base is not None:
        summary["base_model_name_or_path"] = result.base
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
