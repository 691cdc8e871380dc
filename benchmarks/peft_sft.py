"""W-SFT (../shared/BENCHMARKS.md) with full fine-tuning vs LoRA, measured in one run.

Each variant runs in its own subprocess (peak RSS is per process), alternating variants
between rounds so drift on a shared machine hits both alike:

    python benchmarks/peft_sft.py [--rounds 2] [--rank 16] [--steps 6] [--warmup 2]

Prints one JSON line per (round, variant) and a table of medians: s/step, tokens/s, peak
host RSS of the process, and XLA's own accounting of the compiled step (arguments =
params + optimizer state + batch; temporaries = activations, gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def measure(variant: str, rank: int, steps: int, warmup: int) -> dict:
    """One variant in this process: W-SFT steps through jaxpost's plan, state and step."""
    import resource

    import jax
    import numpy as np

    from jaxpost import sharding as sh
    from jaxpost.models import param_logical_axes, preset
    from jaxpost.optim import OptimizerConfig, make_optimizer
    from jaxpost.peft import lora as L
    from jaxpost.peft import partition as P
    from jaxpost.train.common import ModelSection, model_init, plan_params
    from jaxpost.train.sft import SFTConfig, make_sft_loss
    from jaxpost.train.state import TrainState
    from jaxpost.train.step import make_train_step, state_shardings

    cfg = preset("tiny-llama")
    mesh = sh.make_mesh(sh.MeshConfig(), jax.devices()[:1])
    lora = L.LoraConfig(rank=rank if variant == "lora" else 0, alpha=2.0 * rank, targets=SEVEN)
    recipe = SFTConfig(lora=lora, optimizer=OptimizerConfig(lr=1e-4, schedule="constant"))
    plan = plan_params(recipe, cfg, *model_init(ModelSection(preset="tiny-llama"), cfg, mesh, 0),
                       param_logical_axes(cfg), mesh)
    opt = make_optimizer(recipe.optimizer, 100)
    trainable, frozen = P.split(plan.init(), plan.mask)
    state = TrainState.create(trainable, opt, seed=0, frozen=frozen)
    shardings = state_shardings(jax.eval_shape(lambda: state), plan.shardings, mesh)
    state = jax.device_put(state, shardings)
    b, t = 4, 256
    rng = np.random.default_rng(1)
    batch = sh.shard_batch({
        "tokens": rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.int32)}, mesh)
    step = make_train_step(make_sft_loss(plan.model_cfg), opt, mesh=mesh,
                           state_sharding=shardings,
                           batch_sharding=jax.tree.map(lambda x: x.sharding, batch),
                           update_masks=P.update_masks(state.trainable, plan.mask))
    mem = step.lower(state, batch).compile().memory_analysis()
    for _ in range(warmup):
        state, m = step(state, batch)
        jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"variant": variant, "rank": rank if variant == "lora" else 0,
            "trainable_params": plan.counts.trainable, "s_per_step": med,
            "tokens_per_s": b * t / med, "times": times,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "xla_argument_mib": getattr(mem, "argument_size_in_bytes", 0) / 2**20,
            "xla_temp_mib": getattr(mem, "temp_size_in_bytes", 0) / 2**20,
            "loss_last": float(m["loss"]), "jax": jax.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.rank, args.steps, args.warmup)))
        return
    rows = []
    for r in range(args.rounds):
        for variant in (("full", "lora") if r % 2 == 0 else ("lora", "full")):
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--rank", str(args.rank),
                 "--steps", str(args.steps), "--warmup", str(args.warmup)],
                cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["round"] = r
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| variant | trainable params | s/step | tokens/s | peak RSS MiB | XLA args MiB | XLA temp MiB |")
    print("|---|---|---|---|---|---|---|")
    for variant in ("full", "lora"):
        rs = [x for x in rows if x["variant"] == variant]
        med = lambda k: statistics.median(x[k] for x in rs)  # noqa: E731
        print(f"| {variant}{'' if variant == 'full' else ' r' + str(args.rank)} | "
              f"{rs[0]['trainable_params']:,} | {med('s_per_step'):.3f} | "
              f"{med('tokens_per_s'):.0f} | {med('peak_rss_mib'):.0f} | "
              f"{med('xla_argument_mib'):.0f} | {med('xla_temp_mib'):.0f} |")


if __name__ == "__main__":
    main()
