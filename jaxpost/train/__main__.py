"""`python -m jaxpost.train --config=configs/NAME.py --config.workdir=DIR [--config.a.b=V]`.

Loads the recipe's `get_config()`, applies command-line overrides, validates it into the
trainer's typed config (an unknown key or a wrong type is an error naming the key), and
runs or resumes the training in `workdir`. Config errors, on the command line or in the
recipe, print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxpost.config import ConfigError, override_error, to_dataclass

_VERBOSE = flags.DEFINE_bool("verbose", False, "Keep INFO logs of orbax/grain/jax.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (configs/NAME.py).",
                                          lock_config=True)

#: trainer name -> (module, config class, entry point)
TRAINERS = {
    "sft": ("jaxpost.train.sft", "SFTConfig", "train"),
    "grpo": ("jaxpost.train.grpo", "GRPOConfig", "train"),
    "reward_model": ("jaxpost.train.reward_model", "RewardModelConfig", "train"),
    "gaze_predictor": ("jaxpost.train.gaze_predictor", "GazePredictorConfig", "train"),
}


def load_config(config_dict):
    """The typed config of a recipe's ConfigDict, with its trainer's entry point."""
    trainer = config_dict.get("trainer", "sft")
    if trainer not in TRAINERS:
        raise ConfigError(f"config.trainer={trainer!r}; valid trainers: {sorted(TRAINERS)}")
    module_name, cls_name, fn_name = TRAINERS[trainer]
    module = importlib.import_module(module_name)
    return to_dataclass(getattr(module, cls_name), config_dict), getattr(module, fn_name)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _last_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[-1] if lines else type(e).__name__


def _recipe_path(argv: list[str]) -> str | None:
    """The value of `--config=PATH` / `--config PATH` in `argv`."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
        m = re.match(r"^--?config=(.*)$", arg)
        if m:
            return m.group(1)
    return None


def _override_paths(argv: list[str]) -> list[str]:
    """The dotted keys of the `--config.a.b=V` / `--noconfig.a.b` overrides in `argv`."""
    paths = []
    for arg in argv:
        m = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
        if m:
            paths.append(m.group(1))
    return paths


def _override_problem(argv: list[str]) -> str | None:
    """Which override names no key of the recipe, or what the recipe itself raised (the
    recipe is loaded again, once, to look): ml_collections only says
    `AttributeError: "'lossz'"`."""
    path = _recipe_path(argv)
    if not path:
        return None
    file_name, _, arg = path.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("jaxpost_recipe", file_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg = module.get_config(*([arg] if arg else []))
    except Exception as e:  # noqa: BLE001 - reported, in one line
        return f"--config={path}: the recipe raised {type(e).__name__}: {_last_line(e)}"
    for key in _override_paths(argv):
        problem = override_error(cfg, key)
        if problem:
            return f"--config.{key}: {problem}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with every error as one line on stderr and exit status 2.

    ml_collections applies `--config.a.b=V` overrides while absl parses the flags (not
    when `--config`'s value is first read), and an override of a key the recipe lacks
    raises a bare `AttributeError` / `KeyError` from inside absl: caught here and
    reported with the full dotted key and the section's valid keys.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = str(e).strip().splitlines()
        _fail(lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1].strip()}")
    except OSError as e:  # the recipe file cannot be read
        _fail(f"--config={_recipe_path(argv)}: cannot load the recipe: {_last_line(e)}")
    except (AttributeError, KeyError, IndexError, TypeError) as e:
        _fail(_override_problem(argv)
              or f"cannot apply the --config overrides: {type(e).__name__}: {e}")
    raise AssertionError("unreachable")


def main(argv):
    del argv
    # orbax and grain log every save at INFO through absl; the progress line says enough.
    if absl_logging.get_verbosity() == absl_logging.INFO and not _VERBOSE.value:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jaxpost").setLevel(logging.INFO)
    if _CONFIG.value is None:
        _fail("--config=configs/NAME.py is required")
    try:
        cfg, train = load_config(_CONFIG.value)
    except ConfigError as e:
        _fail(str(e))
    except OSError as e:  # ml_collections defers a recipe file it cannot read to here
        _fail(f"--config={_recipe_path(sys.argv)}: cannot load the recipe: {_last_line(e)}")
    from jaxpost.train.common import ConfigChangedError

    try:
        result = train(cfg)
    except ConfigChangedError as e:  # resuming a workdir with other identity keys
        _fail(str(e))
    for k, v in sorted(result.eval_metrics.items()):
        print(f"{k}: {v:.4f}")
    if result.preempted:
        print(f"preempted: checkpoint saved at step {int(result.state.step)}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
