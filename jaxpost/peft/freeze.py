"""Which parameters train: freeze rules over Hugging Face tensor names, and presets.

Rules are Python regular expressions searched (`re.search`) in each tensor's Hugging Face
name (`model.layers.12.mlp.down_proj.weight`, `model.embed_tokens.weight`,
`lm_head.weight`; see `jaxpost.models.hf.hf_name`). A tensor is frozen if it matches a
`freeze` pattern, or if `trainable` is non-empty and it matches none of `trainable`'s.
Names carry the layer index, so a rule can pick layers of a stacked leaf: the result for
such a leaf is a bool per layer.

A *mask* is a pytree shaped like the params whose leaves are `True` (trains), `False`
(frozen in every layer) or a bool `np.ndarray` [L] (a stacked leaf that trains in some
layers only). `jaxpost.peft.partition` turns a mask into the trainable/frozen split.

Presets (`freeze_preset` in a recipe) expand to rules for a given layer count:

- `mid_mlp(a,b)`: freeze gate/up/down of layers a..b-1 (half-open, as `range(a, b)`);
  the "Scalpel vs Hammer" mid-layer-MLP experiment (ALGORITHMS.md §3).
- `qk_only`: train q_proj and k_proj only (their biases included); the paper's other
  freezing experiment.
- `attention_only`: train the self-attention block only (q/k/v/o, biases, q/k norms).
- `mlp_only`: train the MLPs only.
- `hft(seed)`: Half Fine-Tuning (Hui et al. 2024, ALGORITHMS.md §5.2): in every layer 2
  of {q, k, v, o} are frozen; in a random half of the layers 2 of {gate, up, down} are
  frozen and 1 in the others; norms train; embeddings and lm_head are frozen (the
  paper is silent on them: our choice, documented in ALGORITHMS.md). Deterministic in
  the seed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np

from jaxpost.models.hf import leaf_hf_names

Mask = Any  # pytree of True / False / np.ndarray[bool] (per layer)


class FreezeRuleError(ValueError):
    """A freeze rule or preset is malformed or matches no tensor."""


@dataclasses.dataclass(frozen=True)
class Rules:
    """Freeze / trainable patterns, each tagged with where it came from (for errors)."""

    freeze: tuple[tuple[str, str], ...] = ()  # (pattern, origin such as "freeze")
    trainable: tuple[tuple[str, str], ...] = ()
    keep: tuple[tuple[str, str], ...] = ()  # train unless `freeze` names them, whatever `trainable` says (a reward head)

    def __add__(self, other: "Rules") -> "Rules":
        return Rules(self.freeze + other.freeze, self.trainable + other.trainable,
                     self.keep + other.keep)


def _layers(num_layers: int, idx: Sequence[int]) -> str:
    return "(" + "|".join(str(i) for i in idx) + ")"


def _parse_preset(spec: str) -> tuple[str, list[int]]:
    m = re.fullmatch(r"\s*([a-z_]+)\s*(?:\((.*)\))?\s*", spec)
    if not m:
        raise FreezeRuleError(f"freeze_preset={spec!r} is not NAME or NAME(args); "
                              f"presets: {sorted(PRESETS)}")
    name, arg_text = m.group(1), m.group(2)
    args = []
    for a in (arg_text or "").split(","):
        a = a.strip().split("=")[-1].strip()
        if not a:
            continue
        try:
            args.append(int(a))
        except ValueError:
            raise FreezeRuleError(f"freeze_preset={spec!r}: argument {a!r} is not an "
                                  "integer") from None
    return name, args


def _mid_mlp(num_layers: int, a: int, b: int) -> Rules:
    if not 0 <= a < b <= num_layers:
        raise FreezeRuleError(f"freeze_preset mid_mlp({a},{b}) needs 0 <= a < b <= "
                              f"{num_layers} (the model's layers; the range is a..b-1)")
    return Rules(freeze=((rf"^model\.layers\.{_layers(num_layers, range(a, b))}\.mlp\.",
                          f"freeze_preset mid_mlp({a},{b})"),))


def _hft(num_layers: int, seed: int) -> Rules:
    rng = np.random.default_rng(seed)
    attn, ffn = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
    two_of_three = set(rng.permutation(num_layers)[:num_layers // 2].tolist())
    patterns = [r"^model\.embed_tokens\.", r"^lm_head\."]
    for i in range(num_layers):
        frozen_attn = sorted(rng.choice(4, size=2, replace=False).tolist())
        frozen_ffn = sorted(rng.choice(3, size=2 if i in two_of_three else 1,
                                       replace=False).tolist())
        patterns.append(rf"^model\.layers\.{i}\.self_attn\.("
                        + "|".join(attn[j] for j in frozen_attn) + r")\.")
        patterns.append(rf"^model\.layers\.{i}\.mlp\.("
                        + "|".join(ffn[j] for j in frozen_ffn) + r")\.")
    return Rules(freeze=tuple((p, f"freeze_preset hft({seed})") for p in patterns))


def _simple(trainable: tuple[str, ...], name: str):
    def make(num_layers: int) -> Rules:
        del num_layers
        return Rules(trainable=tuple((p, f"freeze_preset {name}") for p in trainable))
    return make


#: preset name -> (number of integer arguments, rules factory(num_layers, *args)).
PRESETS = {
    "mid_mlp": (2, _mid_mlp),
    "qk_only": (0, _simple((r"\.self_attn\.q_proj\.", r"\.self_attn\.k_proj\."), "qk_only")),
    "attention_only": (0, _simple((r"\.self_attn\.",), "attention_only")),
    "mlp_only": (0, _simple((r"\.mlp\.",), "mlp_only")),
    "hft": (1, _hft),
}


def preset_rules(spec: str, num_layers: int) -> Rules:
    """The rules a `freeze_preset` string stands for on a model with `num_layers`."""
    if not spec:
        return Rules()
    name, args = _parse_preset(spec)
    if name not in PRESETS:
        raise FreezeRuleError(f"freeze_preset={spec!r}: unknown preset {name!r}; presets: "
                              "mid_mlp(a,b), qk_only, attention_only, mlp_only, hft(seed)")
    nargs, factory = PRESETS[name]
    if len(args) != nargs:
        raise FreezeRuleError(f"freeze_preset={spec!r}: {name} takes {nargs} integer "
                              f"argument(s), got {len(args)}")
    return factory(num_layers, *args)


def make_rules(freeze: Sequence[str] = (), trainable: Sequence[str] = (),
               preset: str = "", num_layers: int = 0) -> Rules:
    """Recipe keys `freeze`, `trainable`, `freeze_preset` -> one `Rules` (checked regexes)."""
    for key, patterns in (("freeze", freeze), ("trainable", trainable)):
        if isinstance(patterns, str):
            raise FreezeRuleError(f"{key}={patterns!r} must be a tuple of patterns, e.g. "
                                  f"--config.{key}=\"('{patterns}',)\"")
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise FreezeRuleError(f"{key} pattern {p!r} is not a regular expression: "
                                      f"{e}") from None
    own = Rules(freeze=tuple((p, "freeze") for p in freeze),
                trainable=tuple((p, "trainable") for p in trainable))
    return own + preset_rules(preset, num_layers)


def _no_match_error(pattern: str, origin: str, names: list[str]) -> FreezeRuleError:
    examples = [n for n in names if ".layers.0." in n or ".layers." not in n][:6]
    return FreezeRuleError(
        f"{origin} rule {pattern!r} matches no tensor; rules are regular expressions "
        f"searched in Hugging Face names such as {', '.join(examples)}")


def trainable_mask(params_or_shapes, rules: Rules, *, frozen_by_default: bool = False) -> Mask:
    """Per-leaf trainable mask of a params tree under `rules`.

    Args:
      params_or_shapes: params (or `jax.ShapeDtypeStruct`s) of a model or reward model.
      rules: from `make_rules`.
      frozen_by_default: every tensor not named by a `trainable` pattern is frozen even
        when `trainable` is empty (LoRA: only adapters and named tensors train).

    Returns:
      A mask (see the module docstring).

    Raises:
      FreezeRuleError: a pattern matches no tensor (naming it and some real names).
    """
    names = leaf_hf_names(params_or_shapes)
    flat = [n for ns in names.values() for n in ns]
    for pattern, origin in rules.freeze + rules.trainable + rules.keep:
        if not any(re.search(pattern, n) for n in flat):
            raise _no_match_error(pattern, origin, flat)
    restrict = frozen_by_default or bool(rules.trainable)

    def trains(name: str) -> bool:
        if any(re.search(p, name) for p, _ in rules.freeze):
            return False
        return (not restrict or any(re.search(p, name) for p, _ in rules.trainable)
                or any(re.search(p, name) for p, _ in rules.keep))

    def leaf_mask(key_path, leaf):
        del leaf
        path = tuple(str(getattr(k, "key", k)) for k in key_path)
        per_layer = np.array([trains(n) for n in names[path]])
        if per_layer.all():
            return True
        if not per_layer.any():
            return False
        return per_layer

    return jax.tree_util.tree_map_with_path(leaf_mask, params_or_shapes)


__all__ = ["FreezeRuleError", "Mask", "PRESETS", "Rules", "make_rules", "preset_rules",
           "trainable_mask"]
