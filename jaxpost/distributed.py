"""Multi-host start-up: the `distributed` recipe section and `jax.distributed.initialize`.

jaxpost runs on JAX's own multi-controller runtime: every host runs the same command,
`jax.distributed.initialize` connects them through a coordinator (process 0), and from
then on `jax.devices()` lists every chip of every host. Nothing else is needed: the mesh
spans all devices, each process loads its share of the data (`jax.process_index()`),
and `sharding.shard_batch` assembles the global batch.

Failure handling is JAX's: start-up waits at most `initialization_timeout_s` for every
process to connect, and once running, a process whose peer stops sending heartbeats
for `heartbeat_timeout_s` aborts with "Task N heartbeat timeout" instead of waiting
forever inside a collective.
"""

from __future__ import annotations

import dataclasses
import logging

import jax

log = logging.getLogger(__name__)

CPU_COLLECTIVES = ("gloo", "mpi", "none")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-host run (names as `jax.distributed.initialize`'s).

    All empty (the default): one process, unless `enabled`. On a TPU VM (and under
    SLURM / Kubernetes with JAX's cluster detection) set `enabled=True` and leave the
    three address fields empty: JAX finds them. Elsewhere set all three.
    """

    coordinator_address: str = ""  # "host:port" of process 0's coordinator ("" = let JAX find it, or one process)
    num_processes: int = 0  # processes in the run (0 = let JAX find it)
    process_id: int = -1  # this process's index in [0, num_processes) (-1 = let JAX find it)
    enabled: bool = False  # call jax.distributed.initialize even with the fields above empty (TPU VM pods)
    initialization_timeout_s: int = 300  # start-up: give up if some process has not connected by then
    heartbeat_timeout_s: int = 100  # running: a peer silent this long makes every process abort
    shutdown_timeout_s: int = 300  # exit: how long process 0 waits for the others to finish
    cpu_collectives: str = "gloo"  # CPU cross-process collectives ("gloo", "mpi", "none"); CPU runs need one

    def __post_init__(self):
        explicit = (bool(self.coordinator_address), self.num_processes > 0,
                    self.process_id >= 0)
        if any(explicit) and not all(explicit):
            raise ValueError(
                "distributed: set coordinator_address, num_processes and process_id together "
                f"(got coordinator_address={self.coordinator_address!r}, num_processes="
                f"{self.num_processes}, process_id={self.process_id}); leave all three empty "
                "with enabled=True on a TPU VM, where JAX finds them")
        if all(explicit) and not self.process_id < self.num_processes:
            raise ValueError(f"distributed.process_id={self.process_id} must be in "
                             f"[0, num_processes={self.num_processes})")
        for name in ("initialization_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"distributed.{name} must be >= 1, got {getattr(self, name)}")
        if self.cpu_collectives not in CPU_COLLECTIVES:
            raise ValueError(f"distributed.cpu_collectives={self.cpu_collectives!r}; valid: "
                             f"{CPU_COLLECTIVES}")

    @property
    def active(self) -> bool:
        """Whether this config asks for a multi-process run."""
        return self.enabled or bool(self.coordinator_address)


def initialize(cfg: DistributedConfig) -> bool:
    """Joins the multi-host run `cfg` describes; a no-op for one process or when JAX's
    distributed runtime is already up (a recipe that runs another, e.g. GRPO's SFT
    warm-up). Must run before anything touches a JAX device.

    Returns:
      Whether this call initialised `jax.distributed`.

    Raises:
      RuntimeError: JAX's start-up failed (a peer never connected within
        `initialization_timeout_s`, a wrong address); the message says which setting.
    """
    if not cfg.active or jax.distributed.is_initialized():
        return False
    if cfg.cpu_collectives != "none":
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    kwargs = dict(initialization_timeout=cfg.initialization_timeout_s,
                  heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
                  shutdown_timeout_seconds=cfg.shutdown_timeout_s)
    if cfg.coordinator_address:
        kwargs.update(coordinator_address=cfg.coordinator_address,
                      num_processes=cfg.num_processes, process_id=cfg.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the settings that matter
        where = (f"coordinator {cfg.coordinator_address}, process {cfg.process_id} of "
                 f"{cfg.num_processes}" if cfg.coordinator_address else
                 "addresses from JAX's cluster detection (TPU VM / SLURM / ...)")
        raise RuntimeError(
            f"jax.distributed.initialize failed ({where}) after at most "
            f"distributed.initialization_timeout_s={cfg.initialization_timeout_s}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check that "
            "every process runs the same command with its own process_id and that the "
            "coordinator address is reachable") from e
    log.info("joined a %d-process run as process %d (%d of %d devices local); a peer silent "
             "for %ds aborts the run", jax.process_count(), jax.process_index(),
             jax.local_device_count(), jax.device_count(), cfg.heartbeat_timeout_s)
    return True


def is_primary() -> bool:
    """Whether this is process 0: the one that logs, shows progress and writes metrics."""
    return jax.process_index() == 0


__all__ = ["CPU_COLLECTIVES", "DistributedConfig", "initialize", "is_primary"]
