"""Shared pieces of the tests that drive the command line as a user would (subprocess)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model and batch small enough that a step takes milliseconds.
TINY_MODEL = [
    "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
    "--config.model.num_layers=1", "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1", "--config.model.head_dim=16",
]
TINY_SFT = [*TINY_MODEL, "--config.data.seq_len=32", "--config.data.batch_size=8",
            "--config.data.num_records=200", "--config.log_every=1", "--config.eval_every=0"]


def xla_flags(devices: int) -> str:
    """This process's XLA_FLAGS (tests/conftest.py's optimisation level included) with
    `devices` host devices: for the processes a test compares with its own results."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", ""))
    return f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip()
