"""The shared training loop: resume, step, log, evaluate, checkpoint, stop cleanly.

The loop knows an objective only through a `Task`: a loss function for `train_step`, a
host-side source of batches (which may use the current params, as GRPO rollouts do),
its checkpointable state, and an optional evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np
import optax

from jaxpost import sharding as sh
from jaxpost.checkpoint import Checkpointer, Preempted, PreemptionGuard
from jaxpost.metrics import MetricsWriter
from jaxpost.peft import partition
from jaxpost.peft.freeze import Mask
from jaxpost.train.state import TrainState
from jaxpost.train.step import LossFn, make_train_step, state_shardings

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss, the gradient or the updated params became NaN/inf; the update was not
    applied or saved."""


class Task(Protocol):
    """What an objective plugs into the loop."""

    loss_fn: LossFn

    def next_batch(self, state: TrainState) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """This process's rows of the next batch (numpy) and host-side metrics."""

    def data_state(self) -> dict:
        """JSON-serialisable position of the data source (checkpointed)."""

    def set_data_state(self, state: dict) -> None:
        """Restores a position returned by `data_state`."""

    def evaluate(self, params, step: int) -> dict[str, float]:
        """Evaluation metrics (may be empty)."""

    # Optional: `regularisers`, a tuple of `jaxpost.peft.regularisers.Regulariser` added
    # to the loss once per step (absent: none).
    # Optional: `after_step(step, metrics)` is called after each applied step, before
    # that step's `data_state()` is saved (it may add to `metrics`).


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The keys every recipe has (see the public contract in ARCHITECTURE.md)."""

    workdir: str = ""  # checkpoints, TensorBoard events and metrics.jsonl go here (required)
    seed: int = 0  # seeds params init, data order and the step rng
    steps: int = 100  # total optimizer steps
    log_every: int = 10  # write metrics every this many steps (and at the last)
    checkpoint_every: int = 100  # save every this many steps (and at the last); 0: last only
    eval_every: int = 0  # evaluate every this many steps (and at the last); 0: never
    eval_at_start: bool = False  # also evaluate the starting params (logged as step 0)
    keep_checkpoints: int = 3  # how many recent checkpoints to keep
    grad_accum_steps: int = 1  # micro-batches per optimizer step (batch rows must divide)
    async_checkpoints: bool = True  # write checkpoints in the background


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]  # the last evaluation
    preempted: bool
    start_eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # eval_at_start


def _is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def run(cfg: LoopConfig, task: Task, *, init_params: Callable[[], Any], abstract_params,
        param_shardings,
        optimizer: optax.GradientTransformation, mesh, schedule: optax.Schedule | None = None,
        rules=sh.DEFAULT_RULES, metadata: dict | None = None,
        trainable_mask: Mask | None = None) -> LoopResult:
    """Trains to `cfg.steps`, resuming from the latest checkpoint in `cfg.workdir`.

    What it guarantees: a step whose loss, gradient or updated params are not finite
    stops the run (`NonFiniteLossError`) before anything of it is applied or saved; a
    due checkpoint is saved before the evaluation of that step, and an evaluation error
    saves the step anyway before it propagates; SIGTERM/SIGINT during a host-side wait
    (the next batch: data, GRPO rollouts and reward functions; evaluation) interrupts it
    (one process) and saves the last completed step with the data position before the
    lost batch, so the resumed run replays it; a latest checkpoint that does not restore
    is skipped for the newest one that does (warning, and the bad step is renamed to
    `<step>.unreadable-<time>` so that it can be written again); `metrics.jsonl` loses
    the records of steps after the restored one, which this run writes again.

    Args:
      cfg: loop settings.
      task: the objective (loss, batches, eval).
      init_params: returns the starting params when there is no checkpoint (called at
        most once; placed onto `param_shardings` if they are not already).
      abstract_params: pytree of `jax.ShapeDtypeStruct` of the params.
      param_shardings: pytree of NamedSharding matching the params.
      optimizer: the optax transformation (of the trainable params).
      mesh: the device mesh.
      schedule: the learning-rate schedule, logged as `lr`.
      rules: logical-axis rules.
      metadata: JSON-serialisable run description stored with each checkpoint.
      trainable_mask: which params train (`jaxpost.peft.freeze.trainable_mask`; default:
        all). Frozen leaves are kept out of the optimizer; partially frozen stacked
        leaves get per-layer update masks.
    """
    if not cfg.workdir:
        raise ValueError("config.workdir is empty; pass --config.workdir=DIR")
    os.makedirs(cfg.workdir, exist_ok=True)
    if trainable_mask is None:
        trainable_mask = jax.tree.map(lambda _: True, abstract_params)
    counts = partition.count_params(abstract_params, trainable_mask)
    if counts.trainable == 0:
        raise ValueError("nothing to train: the freeze rules freeze every parameter")
    log.info("%s", counts.describe())
    abstract_t, abstract_f = partition.split(abstract_params, trainable_mask)
    masks = partition.update_masks(abstract_t, trainable_mask)
    if all(m is None for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None)):
        masks = None
    ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                        async_save=cfg.async_checkpoints)
    abstract = jax.eval_shape(
        lambda t, f: TrainState.create(t, optimizer, cfg.seed, frozen=f), abstract_t, abstract_f)
    s_shardings = state_shardings(abstract, param_shardings, mesh)

    if ckpt.all_steps():
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, s_shardings)
        latest, state, data_state, skipped = ckpt.restore_readable(target)
        for bad, why in skipped:  # an older step restores: the newer ones are broken
            moved = ckpt.set_aside(bad)
            log.warning("checkpoint %s is unreadable (%s): resuming from step %d instead; "
                        "moved it to %s", ckpt.directory / str(bad), why, latest, moved)
        if data_state is not None:
            task.set_data_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, latest)
        resumed = True
    else:
        params = jax.device_put(init_params(), param_shardings)
        trainable, frozen = partition.split(params, trainable_mask)
        opt_state = jax.jit(optimizer.init, out_shardings=s_shardings.opt_state)(trainable)
        state = TrainState(
            step=jax.device_put(np.zeros((), np.int32), s_shardings.step),
            trainable=trainable, frozen=frozen, opt_state=opt_state,
            rng=jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)), s_shardings.rng))
        resumed = False
    step = int(jax.device_get(state.step))

    train_fn = None
    # Records of steps after the restored one belong to a lost continuation, which this
    # run replays: each step is written once.
    writer = MetricsWriter(cfg.workdir, total_steps=cfg.steps,
                           keep_through_step=step if resumed else -1)
    last: dict[str, float] = {}
    evals: dict[str, float] = {}
    preempted = False
    start_evals: dict[str, float] = {}
    first_record = True

    def save(at: int, data_state: dict, force: bool = False) -> bool:
        return ckpt.save(at, state, data_state=data_state, metadata=metadata, force=force)

    def log_record(at: int, metrics: dict) -> None:
        nonlocal first_record
        if first_record:  # the parameter split, once per process run
            metrics.update(params_trainable=float(counts.trainable),
                           params_frozen=float(counts.frozen))
            first_record = False
        writer.write(at, metrics)

    try:
        with PreemptionGuard() as guard:
            if cfg.eval_at_start and step == 0:
                try:
                    with guard.interruptible():
                        start_evals = {f"eval_{k}": v
                                       for k, v in task.evaluate(state.params, 0).items()}
                    writer.write(0, start_evals)
                except Preempted:
                    log.warning("preemption signal during the evaluation at start: exiting "
                                "before the first step (nothing to save)")
                    preempted = True
            while not preempted and step < cfg.steps:
                t0 = time.perf_counter()
                before = task.data_state()  # what a save of `state` (step `step`) stores
                try:
                    with guard.interruptible():
                        host_batch, host_metrics = task.next_batch(state)
                except Preempted:
                    log.warning("preemption signal while preparing the batch of step %d: "
                                "saving step %d and exiting", step + 1, step)
                    if step > 0:
                        save(step, before, force=True)
                    preempted = True
                    break
                batch = sh.shard_batch(host_batch, mesh, rules)
                if train_fn is None:
                    train_fn = make_train_step(
                        task.loss_fn, optimizer, mesh=mesh, state_sharding=s_shardings,
                        batch_sharding=jax.tree.map(lambda x: x.sharding, batch),
                        grad_accum_steps=cfg.grad_accum_steps, schedule=schedule, rules=rules,
                        update_masks=masks, regularisers=getattr(task, "regularisers", ()))
                t_train = time.perf_counter()
                state, metrics = train_fn(state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                metrics["time_train_s"] = time.perf_counter() - t_train
                bad_params = metrics.pop("nonfinite_params", 0.0)
                if metrics.pop("nonfinite"):
                    what = (f"loss={metrics['loss']} and grad_norm={metrics['grad_norm']} are "
                            "finite but the update makes trainable parameters NaN/inf (check "
                            "optimizer.eps, optimizer.lr)" if bad_params else
                            f"loss={metrics['loss']} grad_norm={metrics['grad_norm']} is not "
                            "finite")
                    raise NonFiniteLossError(
                        f"step {step + 1}: {what}; the update was not applied and no "
                        f"checkpoint of it was written (latest checkpoint in {ckpt.directory}: "
                        f"{ckpt.latest_step()})")
                step += 1
                elapsed = time.perf_counter() - t0
                tokens = int(np.sum(host_batch["segment_ids"] != 0)) * jax.process_count() \
                    if "segment_ids" in host_batch else 0
                metrics.update(host_metrics)
                metrics["step_time_s"] = elapsed
                if tokens:
                    metrics["tokens_per_s"] = tokens / elapsed
                last = metrics
                # Optional: host-side state that follows the step's metrics (GRPO's
                # adaptive entropy), updated before the step's data state is saved.
                after_step = getattr(task, "after_step", None)
                if after_step is not None:
                    after_step(step, metrics)

                # Save before evaluating: an evaluation error never loses the step.
                saved = _is_due(step, cfg.checkpoint_every, cfg.steps) and save(
                    step, task.data_state())
                evaluated = cfg.eval_every > 0 and _is_due(step, cfg.eval_every, cfg.steps)
                if evaluated:
                    try:
                        with guard.interruptible():
                            evals = {f"eval_{k}": v
                                     for k, v in task.evaluate(state.params, step).items()}
                    except Preempted:
                        log.warning("preemption signal during the evaluation of step %d: "
                                    "saving it and exiting", step)
                        log_record(step, metrics)
                        if not saved:
                            save(step, task.data_state(), force=True)
                        preempted = True
                        break
                    except Exception:
                        if not saved:
                            save(step, task.data_state(), force=True)
                        log_record(step, metrics)
                        log.error("the evaluation at step %d failed; step %d is saved in %s",
                                  step, step, ckpt.directory)
                        raise
                    metrics.update(evals)
                if evaluated or _is_due(step, cfg.log_every, cfg.steps):
                    log_record(step, metrics)
                if guard.should_stop():
                    log.warning("preemption signal received: saving step %d and exiting", step)
                    save(step, task.data_state(), force=True)
                    preempted = True
                    break
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    return LoopResult(state=state, last_metrics=last, eval_metrics=evals, preempted=preempted,
                      start_eval_metrics=start_evals)


__all__ = ["LoopConfig", "LoopResult", "NonFiniteLossError", "Task", "run"]
