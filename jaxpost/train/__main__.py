"""`python -m jaxpost.train --config=configs/NAME.py --config.workdir=DIR [--config.a.b=V]`.

Loads the recipe's `get_config()`, applies command-line overrides, validates it into the
trainer's typed config (an unknown key or a wrong type is an error naming the key), and
runs or resumes the training in `workdir`.
"""

from __future__ import annotations

import importlib
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxpost.config import ConfigError, to_dataclass

_VERBOSE = flags.DEFINE_bool("verbose", False, "Keep INFO logs of orbax/grain/jax.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (configs/NAME.py).",
                                          lock_config=True)

#: trainer name -> (module, config class, entry point)
TRAINERS = {
    "sft": ("jaxpost.train.sft", "SFTConfig", "train"),
    "grpo": ("jaxpost.train.grpo", "GRPOConfig", "train"),
    "reward_model": ("jaxpost.train.reward_model", "RewardModelConfig", "train"),
}


def load_config(config_dict):
    """The typed config of a recipe's ConfigDict, with its trainer's entry point."""
    trainer = config_dict.get("trainer", "sft")
    if trainer not in TRAINERS:
        raise ConfigError(f"config.trainer={trainer!r}; valid trainers: {sorted(TRAINERS)}")
    module_name, cls_name, fn_name = TRAINERS[trainer]
    module = importlib.import_module(module_name)
    return to_dataclass(getattr(module, cls_name), config_dict), getattr(module, fn_name)


def main(argv):
    del argv
    # orbax and grain log every save at INFO through absl; the progress line says enough.
    if absl_logging.get_verbosity() == absl_logging.INFO and not _VERBOSE.value:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jaxpost").setLevel(logging.INFO)
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/NAME.py is required")
    try:
        cfg, train = load_config(_CONFIG.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    result = train(cfg)
    for k, v in sorted(result.eval_metrics.items()):
        print(f"{k}: {v:.4f}")
    if result.preempted:
        print(f"preempted: checkpoint saved at step {int(result.state.step)}")


if __name__ == "__main__":
    app.run(main)
