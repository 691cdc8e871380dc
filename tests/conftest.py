"""Test set-up: 8 fake CPU devices so mesh tests run anywhere; float32 matmuls exact."""

import os

# Must happen before jax is imported anywhere: tests see 8 CPU devices; single-device
# tests use jax.devices()[:1] explicitly or run on the default device.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
