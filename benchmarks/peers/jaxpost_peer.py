"""jaxpost on the standard workloads, through the code paths a user runs.

W-SFT: `jaxpost.train.step.make_train_step` with `jaxpost.train.sft.make_sft_loss`.
W-GEN: `jaxpost.sampling.Sampler`.
W-GRPO: the GRPO recipe's own `jaxpost.train.grpo.GRPOTask` (built from a `GRPOConfig`
with the workload's knobs, params planned by `plan_params`, the reference by
`reference_params`, as `jaxpost.train.grpo.train` does), fed by a JSONL prompt file of
random ids through the recipe's prompt stream, scored by `benchmarks.workloads:even_fraction`
through its `RewardSet`; each step is `task.next_batch(state)` then the train step built
from `task.loss_fn` as `jaxpost.train.loop.run` builds it. The split comes from the task's
own metrics (`time_rollout_s`, `time_reward_s`, `time_old_logprobs_s`, `time_reference_s`);
update = the train step and the fetch of its metrics (the loop's `time_train_s`); the step
time is the whole iteration (the loop's `step_time_s`).
The one change to the task: its sampling config stops at no EOS (the workload samples
exactly `new_tokens` tokens per completion).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from jaxpost import sharding as sh
from jaxpost.models import init_params, param_logical_axes, preset
from jaxpost.optim import OptimizerConfig, make_optimizer, make_schedule
from jaxpost.peft import partition
from jaxpost.sampling import Sampler, SamplingConfig
from jaxpost.tokenizer import Tokenizer
from jaxpost.train.state import TrainState
from jaxpost.train.step import make_train_step, state_shardings

from benchmarks import workloads as W

PEER = "jaxpost"
VERSIONS = {"jax": jax.__version__,
            "jaxlib": __import__("jaxlib").__version__, "backend": jax.default_backend(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}

_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "num_kv_heads",
           "intermediate_size")


def model_config(spec: W.Spec):
    """The spec's model as jaxpost's preset of that name, computing in the spec's dtype
    with float32 master weights (quick: its dims shrunk)."""
    dims = W.model(spec)
    return preset(spec.model, dtype=spec.dtype, **{k: dims[k] for k in _FIELDS})


def _device() -> dict:
    """The device kind the workload ran on (the report looks up its spec-sheet peak)."""
    kind = jax.devices()[0].device_kind
    return {"device_kind": kind}


def _mesh():
    return sh.make_mesh(sh.MeshConfig(), devices=jax.devices()[:1])


def w_sft(spec: W.Spec) -> list[dict]:
    from jaxpost.train.sft import make_sft_loss
    s, cfg, dims = W.sft(spec), model_config(spec), W.model(spec)
    B, T = s["batch"], s["seq"]
    rng = np.random.default_rng(1)
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
             "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.int32)}
    mesh = _mesh()
    pshard = sh.param_shardings(cfg, mesh)
    params = jax.device_put(init_params(cfg, jax.random.key(0)), pshard)
    opt = make_optimizer(OptimizerConfig(lr=s["lr"], schedule="constant", warmup_steps=0,
                                         weight_decay=0.01), 100)
    state = TrainState.create(params, opt, 0)
    sshard = state_shardings(jax.eval_shape(lambda: state), pshard, mesh)
    state = jax.device_put(state, sshard)  # as the loop places it
    placed = sh.shard_batch(batch, mesh)
    step = make_train_step(make_sft_loss(cfg), opt, mesh=mesh, state_sharding=sshard,
                           batch_sharding=jax.tree.map(lambda x: x.sharding, placed))
    t0 = time.perf_counter()
    state, m = step(state, placed)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(s["warmup"] - 1):
        state, m = step(state, placed)
        jax.block_until_ready(m)
    ts, losses = [], [float(m["loss"])]
    for _ in range(s["steps"]):
        t0 = time.perf_counter()
        state, m = step(state, placed)
        jax.block_until_ready(m)
        ts.append(time.perf_counter() - t0)
        losses.append(float(m["loss"]))
    fl = W.sft_flops_per_step(s, dims)
    return [W.record(PEER, "W-SFT", ts, tokens_per_iter=B * T,
                     extra={"flops_per_step": fl,
                            "achieved_gflops": fl / statistics.median(ts) / 1e9,
                            "first_step_incl_compile_s": compile_s, "loss_first": losses[0],
                            "loss_last": losses[-1], "dtype": spec.dtype, **_device()},
                     versions=VERSIONS)]


def w_gen(spec: W.Spec) -> list[dict]:
    g, cfg = W.gen(spec), model_config(spec)
    B, P, N = g["batch"], g["prompt_len"], g["new_tokens"]
    params = init_params(cfg, jax.random.key(0))
    sampler = Sampler(cfg)
    prompts = np.random.default_rng(2).integers(0, cfg.vocab_size, (B, P)).astype(np.int32)
    lengths = np.full((B,), P, np.int32)
    scfg = SamplingConfig(max_new_tokens=N, temperature=g["temperature"], eos_ids=())
    t0 = time.perf_counter()
    out = jax.block_until_ready(sampler(params, prompts, lengths, jax.random.key(0), scfg))
    compile_s = time.perf_counter() - t0
    for i in range(g["warmup"] - 1):
        out = jax.block_until_ready(sampler(params, prompts, lengths, jax.random.key(100 + i),
                                            scfg))
    ts = []
    for i in range(g["reps"]):
        t0 = time.perf_counter()
        out = jax.block_until_ready(sampler(params, prompts, lengths, jax.random.key(i + 1), scfg))
        ts.append(time.perf_counter() - t0)
    if int(np.min(np.asarray(out.lengths))) != N:
        raise RuntimeError(f"W-GEN: a sequence stopped before {N} tokens")
    return [W.record(PEER, "W-GEN", ts, tokens_per_iter=B * N,
                     extra={"first_call_incl_compile_s": compile_s, "dtype": spec.dtype,
                            "decode_bytes": W.decode_bytes(W.model(spec), B, P, N),
                            **_device()}, versions=VERSIONS)]


class IdTokenizer(Tokenizer):
    """Text is token ids in decimal separated by spaces: a prompt of k ids is k tokens.
    No BOS, pad 0; decode writes the ids back (what `even_fraction` reads)."""

    def __init__(self, vocab_size: int):
        self._vocab = vocab_size

    vocab_size = property(lambda self: self._vocab)
    bos_id = property(lambda self: None)
    eos_id = property(lambda self: 2)
    pad_id = property(lambda self: 0)

    def id_to_token(self, token_id: int) -> str:
        return str(int(token_id))

    def encode_with_offsets(self, text: str):
        ids, offsets, pos = [], [], 0
        for word in text.split():
            start = text.index(word, pos)
            pos = start + len(word)
            ids.append(int(word))
            offsets.append((start, pos))
        return ids, offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(int(i)) for i in ids)


#: W-GRPO's memory variants (item 3 of the benchmark issue), each its own table row:
#: beta 0 keeps no reference; LoRA (rank 8 on q/v, PEFT's default targets) takes the
#: reference as the base with the adapters off, so no second copy of the params either.
GRPO_VARIANTS = {"": {}, "beta0": {"beta": 0.0}, "lora": {"lora_rank": 8}}


def grpo_config(spec: W.Spec, workdir: str, prompt_file: str, steps: int, variant: str = ""):
    """The `GRPOConfig` of W-GRPO: the workload's knobs, prompts from `prompt_file`;
    `variant` one of `GRPO_VARIANTS`."""
    from jaxpost.peft.lora import LoraConfig
    from jaxpost.train.common import ModelSection
    from jaxpost.train.grpo import GRPOConfig, GRPOSection, PromptSection
    g = {**W.grpo(spec), **GRPO_VARIANTS[variant]}
    rank = g.get("lora_rank", 0)
    return GRPOConfig(
        lora=LoraConfig(rank=rank, alpha=2.0 * rank),
        workdir=workdir, seed=0, steps=steps, log_every=1, checkpoint_every=0,
        model=ModelSection(preset=spec.model, dtype=spec.dtype),
        prompts=PromptSection(source=prompt_file, chat=False),
        grpo=GRPOSection(num_generations=g["group_size"], prompts_per_step=g["num_prompts"],
                         max_prompt_length=g["prompt_len"],
                         max_completion_length=g["new_tokens"], beta=g["beta"],
                         epsilon=g["eps_clip"], loss_type="grpo",
                         temperature=g["temperature"]),
        reward_fns=("benchmarks.workloads:even_fraction",),
        optimizer=OptimizerConfig(lr=g["lr"], schedule="constant", warmup_steps=0,
                                  weight_decay=0.01))


def _write_prompts(path: str, n: int, length: int, vocab: int) -> None:
    rng = np.random.default_rng(3)
    with open(path, "w") as f:
        for row in rng.integers(0, vocab, (n, length)):
            f.write(json.dumps({"prompt": " ".join(map(str, row))}) + "\n")


def w_grpo(spec: W.Spec, variant: str = "") -> list[dict]:
    from jaxpost.train.common import model_init, plan_params, reference_params
    from jaxpost.train.grpo import GRPOTask
    g = W.grpo(spec)
    total = g["warmup"] + g["steps"]
    model_cfg = model_config(spec)
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        prompt_file = os.path.join(tmp, "prompts.jsonl")
        _write_prompts(prompt_file, g["num_prompts"] * (total + 1), g["prompt_len"],
                       model_cfg.vocab_size)
        cfg = grpo_config(spec, tmp, prompt_file, total, variant)
        mesh = _mesh()
        tokenizer = IdTokenizer(model_cfg.vocab_size)
        # As jaxpost.train.grpo.train: the params plan, the reference, the task.
        plan = plan_params(cfg, model_cfg, *model_init(cfg.model, model_cfg, mesh, cfg.seed),
                           param_logical_axes(model_cfg), mesh)
        task = GRPOTask(cfg, plan.model_cfg, tokenizer, mesh, reference_params(plan))
        task.sampling = dataclasses.replace(task.sampling, eos_ids=())  # no early stop
        # As jaxpost.train.loop.run: the state and the jitted step.
        optimizer = make_optimizer(cfg.optimizer, cfg.steps)
        abstract_t, abstract_f = partition.split(plan.abstract, plan.mask)
        masks = partition.update_masks(abstract_t, plan.mask)
        if all(m is None for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None)):
            masks = None
        abstract = jax.eval_shape(
            lambda t, f: TrainState.create(t, optimizer, cfg.seed, frozen=f), abstract_t,
            abstract_f)
        s_shardings = state_shardings(abstract, plan.shardings, mesh)
        trainable, frozen = partition.split(jax.device_put(plan.init(), plan.shardings),
                                            plan.mask)
        state = TrainState(
            step=jax.device_put(np.zeros((), np.int32), s_shardings.step),
            trainable=trainable, frozen=frozen,
            opt_state=jax.jit(optimizer.init, out_shardings=s_shardings.opt_state)(trainable),
            rng=jax.device_put(jax.random.key_data(jax.random.key(cfg.seed)), s_shardings.rng))
        train_fn = None
        steps, phases = [], {k: [] for k in ("rollout", "reward", "old_logprobs", "reference",
                                             "update")}
        first_step_s, rewards = None, []
        for it in range(total):
            t0 = time.perf_counter()
            task.data_state()  # the loop reads it before each batch (what a save stores)
            host_batch, host_metrics = task.next_batch(state)
            batch = sh.shard_batch(host_batch, mesh)
            if train_fn is None:
                train_fn = make_train_step(
                    task.loss_fn, optimizer, mesh=mesh, state_sharding=s_shardings,
                    batch_sharding=jax.tree.map(lambda x: x.sharding, batch),
                    grad_accum_steps=cfg.grad_accum_steps,
                    schedule=make_schedule(cfg.optimizer, cfg.steps), update_masks=masks,
                    regularisers=getattr(task, "regularisers", ()))
            t1 = time.perf_counter()
            state, metrics = train_fn(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            t2 = time.perf_counter()
            if metrics.get("nonfinite"):
                raise FloatingPointError(f"W-GRPO step {it + 1}: non-finite loss {metrics}")
            if it == 0:
                first_step_s = t2 - t0
            if it < g["warmup"]:
                continue
            steps.append(t2 - t0)
            phases["update"].append(t2 - t1)
            for k in ("rollout", "reward", "old_logprobs", "reference"):
                phases[k].append(host_metrics[f"time_{k}_s"])
            rewards.append(host_metrics.get("reward_mean", float("nan")))
    g_tokens = g["num_prompts"] * g["group_size"] * g["new_tokens"]
    return [W.record(PEER, "W-GRPO", steps, tokens_per_iter=g_tokens,
                     extra={**{f"{k}_median": statistics.median(v) for k, v in phases.items()},
                            "first_step_incl_compile_s": first_step_s,
                            "reward_mean_last": rewards[-1] if rewards else None,
                            "dtype": spec.dtype, **_device(),
                            "rollout_bytes": W.decode_bytes(
                                W.model(spec), g["num_prompts"] * g["group_size"],
                                g["prompt_len"], g["new_tokens"]),
                            "reference": ("none" if cfg.grpo.beta == 0 else
                                          "the base, adapters off" if cfg.lora.rank else
                                          "a copy of the starting params"),
                            **({"row": f"{PEER}-{variant}"} if variant else {})},
                     versions=VERSIONS)]


WORKLOADS = {"sft": w_sft, "gen": w_gen, "grpo": w_grpo,
             "grpo-beta0": functools.partial(w_grpo, variant="beta0"),
             "grpo-lora": functools.partial(w_grpo, variant="lora")}
