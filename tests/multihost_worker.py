"""One process of a multi-host test (tests/test_multihost.py), started as a subprocess.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR HEARTBEAT_S

Joins a localhost `jax.distributed` run, exercises the paths that only several
processes take (the per-process slices of `shard_batch`, `local_rows`, the all-gathers
of `global_value` / `gather_processes` / `PreemptionGuard.should_stop` / `to_hf`), writes
what it saw to OUT_DIR/report_<id>.json, then trains SFT "forever" (100k steps) in
OUT_DIR/run, so that the test can kill a peer mid-run.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def distinct_characters(prompts, completions, **columns) -> list[float]:
    """A reward with spread even for an untrained model: distinct characters."""
    del prompts, columns
    return [float(len(set(c))) for c in completions]


def main(argv: list[str]) -> None:
    pid, num, port, out, heartbeat = (int(argv[1]), int(argv[2]), argv[3], argv[4],
                                      int(argv[5]))
    from jaxpost.distributed import DistributedConfig, initialize

    dist = DistributedConfig(coordinator_address=f"localhost:{port}", num_processes=num,
                             process_id=pid, initialization_timeout_s=60,
                             heartbeat_timeout_s=heartbeat, shutdown_timeout_s=10)
    assert initialize(dist)
    import jax
    import numpy as np

    from jaxpost import sharding as sh
    from jaxpost.checkpoint import PreemptionGuard
    from jaxpost.models import init_params, tiny, to_hf

    mesh = sh.make_mesh()
    local = (np.arange(12).reshape(4, 3) + 100 * pid).astype(np.int32)  # this process's rows
    batch = sh.shard_batch(local, mesh)
    guard = PreemptionGuard(signals=())
    if pid == num - 1:
        guard.request()  # only the last process was "signalled": all must agree to stop
    cfg = tiny("llama")
    params = jax.jit(lambda: init_params(cfg, jax.random.key(0)),
                     out_shardings=sh.param_shardings(cfg, mesh))()
    to_hf(cfg, params, os.path.join(out, "hf"))  # gathers every tensor; process 0 writes
    report = {
        "process_count": jax.process_count(), "device_count": jax.device_count(),
        "global_shape": list(batch.shape),
        "global": sh.global_value(batch).tolist(),
        "local_rows": sh.local_rows(batch).tolist(),
        "shard_rows": sorted({s.index[0].start for s in batch.addressable_shards}),
        "gathered": sh.gather_processes(np.asarray([pid, 10 + pid])).tolist(),
        "should_stop": guard.should_stop(),
    }
    with open(os.path.join(out, f"report_{pid}.json"), "w") as f:
        json.dump(report, f)

    from jaxpost.config import to_config_dict, to_dataclass
    from jaxpost.train import sft

    run = to_config_dict(sft.SFTConfig())
    run.update(workdir=os.path.join(out, "run"), steps=100_000, log_every=1,
               checkpoint_every=0, eval_every=0)
    run.model.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                     num_kv_heads=1, head_dim=16)
    run.data.update(seq_len=32, batch_size=8, num_records=200)
    run.distributed = to_config_dict(dist)
    sft.train(to_dataclass(sft.SFTConfig, run))


if __name__ == "__main__":
    main(sys.argv)
