"""`python -m jaxpost.export --workdir=DIR --out=PATH [--step=N]`: a checkpoint's model as
a Hugging Face folder (config.json + safetensors) that `transformers` loads."""

from __future__ import annotations

import json
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging

from jaxpost.checkpoint import model_config_from_metadata, open_run
from jaxpost.models import to_hf

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Folder to write the Hugging Face model to.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")

__all__ = ["export", "model_config_from_metadata"]


def export(workdir: str, out: str, step: int | None = None) -> int:
    """Writes the params of `workdir`'s checkpoint `step` (default latest) to `out`."""
    with open_run(workdir, step) as run:
        cfg = run.model_config()
        params = run.params()
        step = run.step
    to_hf(cfg, jax.device_get(params), out)
    return step


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if not _WORKDIR.value or not _OUT.value:
        raise app.UsageError("--workdir and --out are required")
    try:
        step = export(_WORKDIR.value, _OUT.value, _STEP.value)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"exported_step": step, "out": _OUT.value}))


if __name__ == "__main__":
    app.run(main)
