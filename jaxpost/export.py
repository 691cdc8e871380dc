"""`python -m jaxpost.export --workdir=DIR --out=PATH [--step=N]`: a checkpoint's model as
a Hugging Face folder (config.json + safetensors) that `transformers` loads."""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging

from jaxpost.checkpoint import Checkpointer
from jaxpost.models import ModelConfig, to_hf

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Folder to write the Hugging Face model to.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def model_config_from_metadata(metadata: dict) -> ModelConfig:
    """The ModelConfig a training run stored in its checkpoint metadata."""
    if "model" not in metadata:
        raise ValueError("checkpoint metadata has no 'model' entry; was it written by "
                         "`python -m jaxpost.train`?")
    return ModelConfig.from_dict(metadata["model"])


def export(workdir: str, out: str, step: int | None = None) -> int:
    """Writes the params of `workdir`'s checkpoint `step` (default latest) to `out`."""
    directory = os.path.join(workdir, "checkpoints")
    with Checkpointer(directory, async_save=False) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {directory}")
        cfg = model_config_from_metadata(ckpt.metadata(step))
        state, _ = ckpt.restore(step)
    params = state["params"]
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
