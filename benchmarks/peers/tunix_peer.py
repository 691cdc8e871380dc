"""Tunix 0.1.7 (JAX/Flax NNX), float32: PeftTrainer (W-SFT), Sampler (W-GEN), GRPOLearner.

As ../shared/peers/tunix_bench.py; runs in its own environment (`--tunix-python`; Tunix
pins a transformers that the torch peers' environment does not have).
Model: tunix.models.llama3.model.Llama3 with the tiny-llama dims (Tunix's initialisers).
W-SFT: PeftTrainer (full-parameter) with its default loss, optax.adamw(lr, wd 0.01);
positions / causal mask as tunix/cli/peft_main.py builds them. Step time = interval between
successive batch pulls of the trainer loop (it keeps <= 2 steps in flight).
W-GEN: tunix.generate.sampler.Sampler, top_p 1.0 / top_k None (plain categorical).
W-GRPO: GRPOLearner + RLCluster (vanilla rollout), 1x1 mesh with Auto axes (jax.make_mesh's
Explicit axes break Tunix's embedding gather), prompts as one np.ndarray leaf; the split from
wrapping RLCluster.generate / get_ref_per_token_logps / update_actor.
"""

from __future__ import annotations

import os
import statistics
import time
from importlib.metadata import version

import jax
import numpy as np
import optax
from flax import nnx

import tunix  # noqa: F401 - the import that says whether the peer is installed
from tunix.models.llama3 import model as llama3_lib

from benchmarks import workloads as W

PEER = "tunix"
VERSIONS = {"google-tunix": version("google-tunix"), "jax": jax.__version__,
            "flax": version("flax"), "optax": optax.__version__,
            "backend": jax.default_backend(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def model_config(c: dict):
    return llama3_lib.ModelConfig(
        num_layers=c["num_layers"], vocab_size=c["vocab_size"], embed_dim=c["hidden_size"],
        hidden_dim=c["intermediate_size"], num_heads=c["num_heads"], head_dim=c["head_dim"],
        num_kv_heads=c["num_kv_heads"], rope_theta=int(c["rope_theta"]),
        norm_eps=c["rms_norm_eps"], weight_tying=c["tie_embeddings"])


def make_model(spec: W.Spec, seed: int = 0):
    return llama3_lib.Llama3(model_config(W.model(spec)), rngs=nnx.Rngs(seed))


class IdTokenizer:
    """What tunix.generate.tokenizer_adapter accepts: text is decimal ids split by spaces.
    No BOS (bos_id 0 is falsy), pad 0, eos 2."""

    def encode(self, text, **kw):
        return [int(t) for t in text.split()]

    def decode(self, ids, **kw):
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return 0

    def eos_id(self):
        return 2

    def pad_id(self):
        return 0


class TimedIter:
    """Records when each item is pulled (a trainer loop's step boundaries)."""

    def __init__(self, items):
        self.items, self.stamps = list(items), []

    def __iter__(self):
        for it in self.items:
            self.stamps.append(time.perf_counter())
            yield it


def w_sft(spec: W.Spec) -> list[dict]:
    from tunix.sft import peft_trainer, utils as sft_utils
    s, c = W.sft(spec), W.model(spec)
    B, T, warm, steps = s["batch"], s["seq"], s["warmup"], s["steps"]
    trainer = peft_trainer.PeftTrainer(
        make_model(spec), optax.adamw(s["lr"], weight_decay=0.01),
        peft_trainer.TrainingConfig(eval_every_n_steps=10_000, max_steps=warm + steps))

    def gen_model_input_fn(x):
        mask = x.input_mask.astype(bool)
        return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                "positions": sft_utils.build_positions_from_mask(mask),
                "attention_mask": sft_utils.make_causal_attn_mask(mask)}

    trainer = trainer.with_gen_model_input_fn(gen_model_input_fn)
    ids = np.random.default_rng(1).integers(1, c["vocab_size"], (B, T)).astype(np.int32)
    batch = peft_trainer.TrainingInput(input_tokens=ids, input_mask=np.ones((B, T), np.int32))
    data = TimedIter([batch] * (warm + steps + 1))
    trainer.train(data)
    st = data.stamps
    ivals = [st[i + 1] - st[i] for i in range(len(st) - 1)]
    ts = ivals[warm:]
    fl = W.sft_flops_per_step(s, c)
    return [W.record(PEER, "W-SFT", ts, tokens_per_iter=B * T,
                     extra={"variant": "PeftTrainer", "flops_per_step": fl,
                            "achieved_gflops": fl / statistics.median(ts) / 1e9,
                            "warmup_intervals_s": [round(x, 3) for x in ivals[:warm]]},
                     versions=VERSIONS)]


def prompts_text(n: int, P: int, vocab: int, seed: int) -> list[str]:
    ids = np.random.default_rng(seed).integers(3, vocab, (n, P))
    return [" ".join(map(str, r)) for r in ids]


def w_gen(spec: W.Spec) -> list[dict]:
    from tunix.generate import sampler as sampler_lib
    g, c = W.gen(spec), W.model(spec)
    B, P, N = g["batch"], g["prompt_len"], g["new_tokens"]
    sampler = sampler_lib.Sampler(
        make_model(spec), IdTokenizer(),
        sampler_lib.CacheConfig(cache_size=P + N, num_layers=c["num_layers"],
                                num_kv_heads=c["num_kv_heads"], head_dim=c["head_dim"]))
    prompts = prompts_text(B, P, c["vocab_size"], 2)

    def run(seed):
        return sampler(prompts, max_generation_steps=N, max_prompt_length=P,
                       temperature=g["temperature"], top_p=1.0, top_k=None, seed=seed,
                       pad_output=True)

    t0 = time.perf_counter()
    out = run(0)
    first = time.perf_counter() - t0
    for i in range(g["warmup"] - 1):
        out = run(100 + i)
    ts = []
    for i in range(g["reps"]):
        t0 = time.perf_counter()
        out = run(i + 1)
        ts.append(time.perf_counter() - t0)
    return [W.record(PEER, "W-GEN", ts, tokens_per_iter=B * N,
                     extra={"variant": "Sampler", "first_call_incl_compile_s": first,
                            "out_lens": sorted({len(t) for t in out.tokens})},
                     versions=VERSIONS)]


def w_grpo(spec: W.Spec) -> list[dict]:
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
    g, c = W.grpo(spec), W.model(spec)
    NP, G, P, N = g["num_prompts"], g["group_size"], g["prompt_len"], g["new_tokens"]
    warm, steps = g["warmup"], g["steps"]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                      rl_cluster_lib.Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.adamw(g["lr"], weight_decay=0.01),
            # +1: step k's duration is the interval between batch pulls k and k+1
            eval_every_n_steps=10_000, max_steps=warm + steps + 1,
            mini_batch_size=NP, train_micro_batch_size=NP),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=N, max_prompt_length=P, kv_cache_size=P + N + 8,
            temperature=g["temperature"], top_p=1.0, top_k=None))
    cluster = rl_cluster_lib.RLCluster(actor=make_model(spec), reference=make_model(spec),
                                       tokenizer=IdTokenizer(), cluster_config=cluster_config)
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, reward_fns=W.even_fraction,
        algo_config=grpo_learner.GRPOConfig(num_generations=G, num_iterations=1,
                                            beta=g["beta"], epsilon=g["eps_clip"]))
    phase = {"generate": [], "get_ref_per_token_logps": [], "get_old_per_token_logps": [],
             "update_actor": []}

    def wrap(name):
        orig = getattr(cluster, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            r = orig(*a, **k)
            jax.block_until_ready(r)
            phase[name].append(time.perf_counter() - t0)
            return r
        setattr(cluster, name, timed)

    for name in phase:
        wrap(name)
    ds = TimedIter([{"prompts": np.array(prompts_text(NP, P, c["vocab_size"], 100 + i))}
                    for i in range(warm + steps + 2)])
    learner.train(ds)
    st = ds.stamps
    ivals = [st[i + 1] - st[i] for i in range(len(st) - 1)]
    ts = ivals[warm:warm + steps] if len(ivals) > warm else ivals
    med = lambda v: statistics.median(v[warm:]) if len(v) > warm else None  # noqa: E731
    return [W.record(PEER, "W-GRPO", ts, tokens_per_iter=NP * G * N,
                     extra={"variant": "GRPOLearner", "rollout_median": med(phase["generate"]),
                            "reference_median": med(phase["get_ref_per_token_logps"]),
                            "old_logprobs_median": med(phase["get_old_per_token_logps"]),
                            "update_median": med(phase["update_actor"]),
                            **{f"{k}_all": [round(x, 3) for x in v] for k, v in phase.items()},
                            "warmup_intervals_s": [round(x, 3) for x in ivals[:warm]]},
                     versions=VERSIONS)]


WORKLOADS = {"sft": w_sft, "gen": w_gen, "grpo": w_grpo}
