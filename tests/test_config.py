"""Tests for jaxpost.config: conversion, every error kind, round trip, describe."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import ml_collections
import pytest

from jaxpost.config import (
    ConfigError, describe, field_help, override_error, to_config_dict, to_dataclass)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule."""

    lr: float = 1e-5  # peak learning rate
    warmup_steps: int = 10  # linear warm-up steps
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up
    clip_norm: Optional[float] = 1.0  # global-norm clipping; None disables
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A toy recipe."""

    workdir: str  # where checkpoints and metrics go
    steps: int = 100  # total optimizer steps
    seed: int = 0
    use_lora: bool = False  # train LoRA adapters instead of full weights
    freeze: tuple[str, ...] = ()  # regexes of frozen parameter paths
    reward_weights: tuple[float, ...] = (1.0,)
    eval_every: int | None = None  # steps between evaluations; None: never
    optimizer: OptimizerConfig = OptimizerConfig()
    extra: Optional[OptimizerConfig] = dataclasses.field(
        default=None, metadata={"help": "a second optimizer"})

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")


def _cfg(**overrides):
    cfg = to_config_dict(Recipe(workdir="/tmp/run"))
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def test_converts_config_dict_with_nested_and_defaults():
    cfg = ml_collections.ConfigDict({
        "workdir": "/tmp/x", "steps": 5, "freeze": ("q_proj", "k_proj"),
        "optimizer": {"lr": 3, "schedule": "linear", "clip_norm": None},
    })
    r = to_dataclass(Recipe, cfg)
    assert r == Recipe(workdir="/tmp/x", steps=5, freeze=("q_proj", "k_proj"),
                       optimizer=OptimizerConfig(lr=3.0, schedule="linear", clip_norm=None))
    assert isinstance(r.optimizer.lr, float)  # int accepted for float and converted


def test_list_from_dict_becomes_tuple():
    r = to_dataclass(Recipe, {"workdir": "w", "freeze": ["a", "b"],
                              "optimizer": {"betas": [0.8, 0.9]}})
    assert r.freeze == ("a", "b") and r.optimizer.betas == (0.8, 0.9)


def test_round_trip_through_config_dict():
    original = Recipe(workdir="/w", steps=7, freeze=("mlp",), eval_every=3,
                      optimizer=OptimizerConfig(lr=2e-4, betas=(0.5, 0.6)),
                      extra=OptimizerConfig(schedule="constant"))
    cfg = to_config_dict(original)
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert isinstance(cfg.optimizer, ml_collections.ConfigDict)
    assert to_dataclass(Recipe, cfg) == original
    assert to_dataclass(Recipe, cfg.to_dict()) == original


def test_none_optional_scalar_becomes_typed_placeholder():
    cfg = to_config_dict(Recipe(workdir="/w"))
    assert cfg.eval_every is None
    cfg.eval_every = 50  # as `--config.eval_every=50` would
    with pytest.raises(TypeError):
        cfg.eval_every = "often"
    assert to_dataclass(Recipe, cfg).eval_every == 50


def test_unknown_key_names_path_valid_keys_and_suggestion():
    cfg = _cfg()
    cfg.optimizer.lrr = 1.0
    with pytest.raises(ConfigError) as e:
        to_dataclass(Recipe, cfg)
    msg = str(e.value)
    assert msg.startswith("config.optimizer.lrr is not a known key; valid keys: lr, warmup_steps")
    assert "(did you mean 'lr'?)" in msg


def test_wrong_type_names_path_expected_and_got():
    expected = r"^config\.optimizer\.lr: expected float, got str 'abc'$"
    with pytest.raises(ConfigError, match=expected):
        to_dataclass(Recipe, {"workdir": "w", "optimizer": {"lr": "abc"}})


@pytest.mark.parametrize("key,value,expected", [
    ("steps", True, "expected int, got bool True"),
    ("steps", 2.5, "expected int, got float 2.5"),
    ("use_lora", 1, "expected bool, got int 1"),
    ("freeze", "q_proj", r"expected tuple\[str, \.\.\.\], got str 'q_proj'"),
    ("freeze", ("a", 3), r"config\.freeze\[1\]: expected str, got int 3"),
    ("eval_every", "10", r"expected int \| None, got str '10'"),
    ("workdir", None, "expected str, got NoneType None"),
])
def test_type_errors(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        to_dataclass(Recipe, {"workdir": "w", key: value})


def test_bad_choice_names_allowed_values():
    with pytest.raises(ConfigError) as e:
        to_dataclass(Recipe, {"workdir": "w", "optimizer": {"schedule": "cosin"}})
    assert str(e.value) == ("config.optimizer.schedule: 'cosin' is not a valid choice; valid: "
                            "'cosine', 'linear', 'constant' (did you mean 'cosine'?)")


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match=r"^config\.workdir is required \(str\) but missing$"):
        to_dataclass(Recipe, {"steps": 3})


def test_wrong_tuple_length_and_non_mapping_section():
    with pytest.raises(ConfigError, match=r"config\.optimizer\.betas: expected tuple\[float, "
                                          r"float\] \(2 items\), got 3 items"):
        to_dataclass(Recipe, {"workdir": "w", "optimizer": {"betas": (0.1, 0.2, 0.3)}})
    with pytest.raises(ConfigError, match=r"config\.optimizer: expected a ConfigDict or dict"):
        to_dataclass(Recipe, {"workdir": "w", "optimizer": 0.1})


def test_post_init_error_is_prefixed_with_where():
    with pytest.raises(ConfigError, match=r"^run: steps must be positive, got 0$"):
        to_dataclass(Recipe, {"workdir": "w", "steps": 0}, where="run")


def test_describe_lists_every_knob_with_type_default_and_help():
    text = describe(Recipe, prefix="config.")
    lines = text.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == [
        "config.workdir", "config.steps", "config.seed", "config.use_lora", "config.freeze",
        "config.reward_weights", "config.eval_every", "config.optimizer",
        *[f"config.optimizer.{f.name}" for f in dataclasses.fields(OptimizerConfig)],
        "config.extra",
        *[f"config.extra.{f.name}" for f in dataclasses.fields(OptimizerConfig)],
    ]
    row = dict(zip(names, lines))
    assert "<required>" in row["config.workdir"] and "where checkpoints" in row["config.workdir"]
    assert "float" in row["config.optimizer.lr"] and "1e-05" in row["config.optimizer.lr"]
    assert row["config.optimizer.lr"].endswith("# peak learning rate")
    assert "one of 'cosine', 'linear', 'constant'" in row["config.optimizer.schedule"]
    assert "# Optimizer and learning-rate schedule." in row["config.optimizer"]
    assert row["config.extra"].endswith("# a second optimizer")
    assert "int | None" in row["config.eval_every"]


def test_field_help_reads_existing_model_config_comments():
    from jaxpost.models.config import ModelConfig

    helps = field_help(ModelConfig)
    assert helps["hidden_size"] == "d_model"
    assert helps["vocab_size"] == ""


def test_override_error_names_the_full_key_valid_keys_and_closest_one():
    cfg = _cfg()
    assert override_error(cfg, "optimizer.lr") is None
    assert override_error(cfg, "freeze[0]") is None  # indexed paths are not checked
    msg = override_error(cfg, "optimizer.lrr")
    assert msg.startswith("config.optimizer.lrr is not a known key; valid keys: betas, clip_norm")
    assert msg.endswith("(did you mean 'lr'?)")
    assert override_error(cfg, "optimiser.lr").startswith("config.optimiser is not a known key")
    assert override_error(cfg, "steps.x") == (
        "config.steps is an int, not a section: config.steps.x names no key")
