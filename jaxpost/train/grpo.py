"""GRPO with verifiable rewards: rollouts, rewards, group-relative per-token advantages,
clipped surrogate with a k3 KL to a frozen reference, on the shared training loop.

One rollout batch (`prompts_per_step` prompts x `num_generations` completions) feeds
`num_iterations` optimizer steps. Host side per rollout: sample with the current params,
decode, score with the reward functions, compute advantages; device side: old-policy and
reference log-probs (each one jitted forward) and the policy step.

Row layout of a rollout batch (`jaxpost.rl.rollout.build_rows`), width
`max_prompt_length + max_completion_length`: the prompt left-padded to
`max_prompt_length`, then the completion right-padded. Logits at columns P-1 .. P+C-2
predict the completion tokens (`jaxpost.rl.rollout.completion_logprobs`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpost import data
from jaxpost import sharding as sh
from jaxpost.distributed import initialize
from jaxpost.eval.generation import pad_prompts
from jaxpost.models import ModelConfig, param_logical_axes
from jaxpost.optim import OptimizerConfig
from jaxpost.peft import partition
from jaxpost.rl import grpo as G
from jaxpost.rl.advantages import estimate_advantages
from jaxpost.rl.credit import resolve_token_credit, token_credit_weights
from jaxpost.rl.rewards import RewardSet, require_some_reward, reward_metrics
from jaxpost.rl.rollout import build_rows, completion_logprobs
from jaxpost.sampling import Sampler, SamplingConfig
from jaxpost.train.common import (
    EvalSection, GenerationEval, RecipeConfig, model_init, plan_params, reference_params,
    run_recipe, setup, sft_warmup)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PromptSection:
    """Where prompts come from (records with `prompt` or chat `messages`, plus columns
    such as `answer` that reward functions receive)."""

    source: str = "synthetic:addition"  # as data.source of SFT: jsonl, array_record, tfds:NAME, synthetic:addition
    split: str = "train"  # TFDS / synthetic split
    data_dir: str = ""  # TFDS data folder
    num_records: int = 20000  # synthetic sources: how many records
    tokenizer: str = "byte"  # "byte", an HF tokenizer folder or a sentencepiece .model
    chat: bool = True  # render prompts through the tokenizer's chat template
    skip_malformed: bool = False  # JSONL: skip and count malformed lines instead of failing


@dataclasses.dataclass(frozen=True)
class GRPOSection:
    """GRPO knobs; names and defaults follow TRL's GRPOConfig where they overlap."""

    num_generations: int = 8  # G: completions per prompt (DeepSeekMath: 64)
    prompts_per_step: int = 8  # prompts per rollout batch, over all processes
    max_prompt_length: int = 64  # prompts are left-truncated to this many tokens
    max_completion_length: int = 32  # completion budget; also Dr. GRPO's constant
    temperature: float = 1.0  # sampling temperature; log-probs use logits / temperature
    top_p: float = 1.0  # nucleus sampling during rollouts
    top_k: int = 0  # top-k during rollouts (0: off)
    beta: float = 0.0  # k3 KL weight to the frozen reference (0: no reference kept; DeepSeekMath 0.04)
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float = 0.0  # upper clip: ratio <= 1 + epsilon_high (0: = epsilon; DAPO 0.28)
    delta: float = 0.0  # two-sided clip cap on the ratio for negative advantages (0: off; INTELLECT-2)
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = "dapo"  # surrogate + aggregation (see jaxpost.rl.grpo.LOSS_TYPES)
    importance_sampling_level: Literal["token", "sequence"] = "token"  # ratio per token, or one per sequence from the mean log-ratio (GSPO)
    use_bias_correction_kl: bool = True  # KL term times the ratio pi/pi_old (DeepSeek-V3.2; TRL's default)
    sapo_temperature_pos: float = 1.0  # sapo: gate temperature where A > 0
    sapo_temperature_neg: float = 1.05  # sapo: gate temperature where A <= 0
    vespo_k_pos: float = 2.0  # vespo: Gamma power k where A >= 0
    vespo_lambda_pos: float = 3.0  # vespo: Gamma decay lambda where A >= 0
    vespo_k_neg: float = 3.0  # vespo: Gamma power k where A < 0
    vespo_lambda_neg: float = 2.0  # vespo: Gamma decay lambda where A < 0
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"  # several rewards: weighted sum then scale_rewards, or per-reward group normalisation then sum then batch normalisation (GDPO)
    top_entropy_quantile: float = 1.0  # policy loss only on the top-rho entropy tokens of each micro-batch (Beyond 80/20: 0.2; 1: all)
    entropy_coef: float = 0.0  # entropy bonus: loss - coef * mean token entropy (0: off; the start value when adaptive)
    use_adaptive_entropy: bool = False  # Skywork-OR1: coef += delta when entropy <= target, else -= delta; applied only while entropy <= target
    entropy_coef_min: float = 0.0  # adaptive entropy: lower bound of the coefficient
    entropy_coef_max: float = 1.0  # adaptive entropy: upper bound of the coefficient
    entropy_coef_delta: float = 0.005  # adaptive entropy: step of the coefficient per optimizer step
    entropy_target: float = 0.2  # adaptive entropy: target mean token entropy (nats)
    off_policy_mask_threshold: float = 0.0  # drop sequences with A < 0 whose mean KL(old || policy) exceeds this (DeepSeek-V3.2; 0: off)
    sync_ref_model: bool = False  # TR-DPO: every ref_model_sync_steps, ref = alpha * policy + (1 - alpha) * ref (needs beta > 0; checkpointed)
    ref_model_mixup_alpha: float = 0.6  # TR-DPO alpha
    ref_model_sync_steps: int = 512  # TR-DPO tau: optimizer steps between syncs
    scale_rewards: Literal["group", "batch", "none"] = "group"  # advantage std normalisation (none: Dr. GRPO)
    advantage_estimator: Literal["grpo", "rloo"] = "grpo"  # jaxpost.rl.advantages: group mean baseline, or RLOO's leave-one-out mean (Ahmadian et al. 2024; TRL RLOOTrainer, whose default is scale_rewards="none")
    num_iterations: int = 1  # mu: optimizer steps per rollout batch
    mask_truncated_completions: bool = False  # DAPO overlong filtering: no loss on truncated rows
    old_logprobs: Literal["recompute", "sampler"] = "recompute"  # mu > 1: old policy from a forward pass or the sampler
    warn_zero_std_rollouts: int = 10  # warn when this many rollout batches in a row have no reward spread in any group (0: never)
    share_prompt_pass: bool = True  # each group's prompt runs once (its KV cache shared by the group) when sampling, scoring the reference and updating: same logits, ~1.6x fewer layer FLOPs per row at P = C, G = 4

    def __post_init__(self):
        if self.num_generations < 2:
            # Every advantage estimator here (scale_rewards group / batch / none) subtracts
            # the group's mean reward; one that needs no group would lift this.
            raise ValueError(
                f"num_generations must be >= 2, got {self.num_generations}: a completion's "
                "advantage is its reward minus the mean of its prompt's group, so a group "
                "of one has advantage 0 and nothing is learned")
        for name in ("prompts_per_step", "num_iterations", "max_prompt_length",
                     "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            raise ValueError("loss_type='luspo' (length-scaled sequence loss) needs "
                             "importance_sampling_level='sequence' (TRL only warns)")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got "
                             f"{self.top_entropy_quantile}")
        if self.off_policy_mask_threshold < 0:
            raise ValueError(f"off_policy_mask_threshold must be > 0 (0: off), got "
                             f"{self.off_policy_mask_threshold}")
        if self.use_adaptive_entropy and not (
                self.entropy_coef_min <= self.entropy_coef_max and self.entropy_coef_delta >= 0):
            raise ValueError("adaptive entropy needs entropy_coef_min <= entropy_coef_max and "
                             f"entropy_coef_delta >= 0, got {self.entropy_coef_min}, "
                             f"{self.entropy_coef_max}, {self.entropy_coef_delta}")
        if self.sync_ref_model:
            if self.beta == 0:
                raise ValueError("sync_ref_model=True with beta=0: there is no reference to "
                                 "synchronise; set grpo.beta > 0 or sync_ref_model=False")
            if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
                raise ValueError(f"ref_model_mixup_alpha must be in [0, 1], got "
                                 f"{self.ref_model_mixup_alpha}")
            if self.ref_model_sync_steps < 1:
                raise ValueError(f"ref_model_sync_steps must be >= 1, got "
                                 f"{self.ref_model_sync_steps}")
        if self.warn_zero_std_rollouts < 0:
            raise ValueError(f"warn_zero_std_rollouts must be >= 0 (0: never), got "
                             f"{self.warn_zero_std_rollouts}")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(RecipeConfig):
    """GRPO from verifiable rewards (DeepSeekMath, Dr. GRPO, DAPO variants)."""

    trainer: str = "grpo"  # which trainer runs this config
    prompts: PromptSection = PromptSection()
    grpo: GRPOSection = GRPOSection()
    reward_fns: tuple[str, ...] = ("jaxpost.rl.rewards:exact_answer",)  # "pkg.module:function" or "pkg.module:factory(k=v)"
    reward_weights: tuple[float, ...] = ()  # one weight per reward function (empty: all 1.0)
    token_credit: str = ""  # per-token credit weights (jaxpost.rl.credit), "pkg.module:fn" or "pkg.module:factory(k=v)", e.g. "jaxpost.rl.gaze:gaze_credit()" ("" = uniform)
    token_credit_mode: Literal["weighted", "reward_to_go"] = "weighted"  # how credit weights and the sequence advantage make token advantages (jaxpost.rl.grpo.token_advantages)
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-6, schedule="constant")
    eval: EvalSection = EvalSection()
    init_sft_config: str = ""  # a recipe file ("configs/x.py", or "configs/x.py:ARG" for get_config(ARG)): train it into WORKDIR/sft_init first when model.init_from is unset
    init_sft_steps: int = 0  # steps of that SFT warm-up (0: its own `steps`)

    identity_keys: ClassVar[tuple[str, ...]] = RecipeConfig.identity_keys + (
        "prompts.source", "prompts.split", "prompts.data_dir", "prompts.num_records",
        "prompts.tokenizer", "prompts.chat", "grpo.sync_ref_model")


def loss_options(g: GRPOSection) -> dict[str, Any]:
    """The `jaxpost.rl.grpo.policy_loss` keywords of the loss variants (TRL's names)."""
    names = ("importance_sampling_level", "use_bias_correction_kl", "sapo_temperature_pos",
             "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
             "vespo_lambda_neg", "top_entropy_quantile")
    return {**{k: getattr(g, k) for k in names},
            "off_policy_mask_threshold": g.off_policy_mask_threshold or None}


def entropy_bonus_enabled(g: GRPOSection) -> bool:
    """Whether the loss has an entropy bonus (a static or an adaptive coefficient)."""
    return g.entropy_coef != 0.0 or g.use_adaptive_entropy


@dataclasses.dataclass
class EntropyController:
    """The entropy-bonus coefficient across steps, as TRL 1.16 runs it (Skywork-OR1's
    adaptive control when `use_adaptive_entropy`).

    Each step applies `coef` (adaptive: only while the entropy measured at the end of
    the previous step is <= `entropy_target`; none is measured before the first step, so
    it applies no bonus). After the step the window's token-mean entropy over the tokens
    the policy term acted on updates it: `coef + delta` (capped at `entropy_coef_max`)
    when at or below the target, else `coef - delta` (floored at `entropy_coef_min`).
    Its state is part of the checkpointed data state, so resume is exact.
    """

    g: GRPOSection
    coef: float = 0.0
    last_entropy: float = float("inf")

    def __post_init__(self):
        self.coef = float(self.g.entropy_coef)

    def applied(self) -> float:
        if self.g.use_adaptive_entropy and not self.last_entropy <= self.g.entropy_target:
            return 0.0
        return self.coef

    def observe(self, entropy: float) -> None:
        if not self.g.use_adaptive_entropy:
            return
        if entropy <= self.g.entropy_target:
            self.coef = min(self.coef + self.g.entropy_coef_delta, self.g.entropy_coef_max)
        else:
            self.coef = max(self.coef - self.g.entropy_coef_delta, self.g.entropy_coef_min)
        self.last_entropy = float(entropy)

    def state(self) -> dict:
        # JSON has no inf: None stands for "nothing measured yet".
        last = None if math.isinf(self.last_entropy) else self.last_entropy
        return {"coef": self.coef, "last_entropy": last}

    def load(self, state: dict) -> None:
        self.coef = float(state["coef"])
        last = state.get("last_entropy")
        self.last_entropy = float("inf") if last is None else float(last)


def prompt_group_size(g: GRPOSection, grad_accum_steps: int = 1) -> int:
    """Rows per shared prompt in each (micro-)batch the GRPO objective sees, 1 when the
    prompt pass is not shared. A rollout batch holds each prompt's `num_generations`
    completions in consecutive rows; `train.step.split_microbatches` deals rows out
    strided, so with `grad_accum_steps` dividing G each micro-batch holds G / accum
    consecutive rows per prompt (otherwise the groups break up: no sharing)."""
    if not g.share_prompt_pass or g.num_generations % grad_accum_steps:
        return 1
    return g.num_generations // grad_accum_steps


def make_grpo_loss(model_cfg: ModelConfig, g: GRPOSection, group_size: int = 1):
    """`loss_fn(params, batch, rng)` of the clipped surrogate (+ beta * k3 KL);
    `group_size` > 1 runs each group's prompt once (`prompt_group_size`)."""
    p, c = g.max_prompt_length, g.max_completion_length
    eps_high = g.epsilon_high or g.epsilon

    def loss_fn(params, batch, rng):
        logp, logits = completion_logprobs(model_cfg, params, batch, p, c, g.temperature,
                                           return_logits=True, rng=rng,
                                           group_size=group_size)
        mask = batch["completion_mask"]
        # The first update on a rollout batch uses the current policy as the old one, so its
        # ratio is exactly 1; later iterations use the stored old-policy log-probs.
        old = jax.lax.stop_gradient(logp)
        if "old_logp" in batch:
            old = jnp.where(batch["first_iteration"][:, None] > 0, old, batch["old_logp"])
        entropies = G.token_entropy(logits)
        loss_sum, count, aux = G.policy_loss(
            logp, old, batch["advantages"], mask, loss_type=g.loss_type,
            max_completion_length=c, epsilon=g.epsilon, epsilon_high=eps_high, beta=g.beta,
            ref_logp=batch.get("ref_logp"), delta=g.delta or None,
            **loss_options(g), entropies=entropies,
            entropy_coef=jnp.mean(batch["entropy_coef"]) if "entropy_coef" in batch else None)
        aux["entropy"] = G.masked_mean_pair(entropies, mask)
        aux["ratio_mean"] = G.masked_mean_pair(jnp.exp(logp - old), mask)
        return loss_sum, count, aux

    return loss_fn


def make_logprob_fn(model_cfg: ModelConfig, g: GRPOSection, mesh, param_shardings=None,
                    rules=sh.DEFAULT_RULES, group_size: int = 1):
    """Jitted `(params, rows) -> logp [N, C]` of the completion tokens (old / reference);
    `rows` holds `tokens`, `positions` and `segment_ids` as laid out by `build_rows`
    (`group_size`: rows per shared prompt, see `completion_logits`).

    Without `param_shardings` the params keep the shardings they have on the mesh (the
    policy with its adapters and the reference without them are two trees: two
    compilations)."""
    p, c = g.max_prompt_length, g.max_completion_length

    def fn(params, rows):
        with sh.logical_rules(mesh, rules):
            return completion_logprobs(model_cfg, params, rows, p, c, g.temperature,
                                       group_size=group_size)

    if param_shardings is None:
        return jax.jit(fn)
    return jax.jit(fn, in_shardings=(param_shardings, None))


def prompt_stream(pr: PromptSection, tokenizer, prompts_per_step: int, seed: int,
                  section: str):
    """This process's stream of prompt batches for a rollout recipe (GRPO, PPO).

    Each process reads its contiguous block of every global batch of `prompts_per_step`
    prompts, so a rollout batch (and its sampling) is the same for any number of
    processes; `section` names the recipe section in the divisibility error.
    """
    procs = jax.process_count()
    if prompts_per_step % procs:
        raise ValueError(f"{section}.prompts_per_step={prompts_per_step} is not divisible by "
                         f"the {procs} processes")
    source = data.open_source(pr.source, split=pr.split, data_dir=pr.data_dir or None,
                              schema="prompt", skip_malformed=pr.skip_malformed,
                              num_records=pr.num_records, seed=seed,
                              skip_hint="pass --config.prompts.skip_malformed=True")
    local = prompts_per_step // procs
    return data.make_prompt_iterator(source, tokenizer, batch_size=local, seed=seed,
                                     chat=pr.chat, shard_block=local)


class GRPOTask:
    """Rollouts with the current policy feed `num_iterations` steps each."""

    def __init__(self, cfg: GRPOConfig, model_cfg: ModelConfig, tokenizer, mesh,
                 reference: Callable[[Any], Any] | None = None):
        g = cfg.grpo
        self.prompts = prompt_stream(cfg.prompts, tokenizer, g.prompts_per_step, cfg.seed,
                                     "grpo")
        self.rewards = RewardSet(cfg.reward_fns, cfg.reward_weights or None)
        # Token credit (jaxpost.rl.credit): per-token weights of each completion.
        self.credit = resolve_token_credit(cfg.token_credit) if cfg.token_credit else None
        self.cfg, self.g, self.tokenizer, self.mesh = cfg, g, tokenizer, mesh
        self.loss_fn = make_grpo_loss(model_cfg, g, prompt_group_size(g, cfg.grad_accum_steps))
        self.sampler = Sampler(model_cfg, mesh)
        self.sampling = SamplingConfig(
            max_new_tokens=g.max_completion_length, temperature=g.temperature, top_p=g.top_p,
            top_k=g.top_k, pad_id=tokenizer.pad_id,
            eos_ids=model_cfg.eos_token_ids or (tokenizer.eos_id,))
        self.logprob_fn = make_logprob_fn(model_cfg, g, mesh,
                                          group_size=prompt_group_size(g))
        # state -> the starting policy's params (the KL anchor; also after a resume).
        self.reference = reference
        if g.beta > 0 and reference is None:
            raise ValueError("grpo.beta > 0 needs a reference policy (train() builds it)")
        self.evaluator = GenerationEval(cfg.eval, model_cfg, tokenizer, mesh, cfg.seed,
                                        workdir=cfg.workdir)
        self._batch = None
        self._uses = 0
        self._prompt_state = self.prompts.get_state()
        self._zero_std_streak = 0  # rollout batches in a row without any reward spread
        self.entropy = EntropyController(g) if entropy_bonus_enabled(g) else None
        if g.loss_type == "cispo" and (g.epsilon_high or g.epsilon) < 1.0:
            log.warning("loss_type='cispo' caps the importance weight at epsilon_high=%g (as "
                        "TRL: unset, it is epsilon), so every weight is clipped below 1; "
                        "ScaleRL recommends grpo.epsilon_high=5.0", g.epsilon_high or g.epsilon)
        if g.importance_sampling_level == "sequence" and g.loss_type in (
                "bnpo", "dr_grpo", "dapo", "cispo"):
            log.warning("importance_sampling_level='sequence' with loss_type=%r sums token "
                        "losses, weighting each sequence by its length; GSPO uses "
                        "loss_type='grpo'", g.loss_type)

    # -- rollout --------------------------------------------------------------------
    def _rollout(self, state) -> tuple[dict, dict]:
        g = self.g
        t0 = time.perf_counter()
        self._prompt_state = self.prompts.get_state()
        records = next(self.prompts)
        rows = [r for r in records for _ in range(g.num_generations)]
        prompt_ids = [r["prompt_ids"][-g.max_prompt_length:] for r in rows]
        width = g.max_prompt_length
        # Shared prompt pass: one prefill per prompt, its cache shared by the G rows;
        # on several processes only where the prompts alone split over them.
        n = prompt_group_size(g)
        if n > 1 and jax.process_count() > 1:
            spec = sh.batch_sharding(self.mesh, (len(records) * jax.process_count(),)).spec
            if not spec or spec[0] is None:
                n = 1
        prompts, lengths = pad_prompts(prompt_ids[::n], self.tokenizer.pad_id, width=width)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)
        # Multi-host: every process samples its own prompts' rows of one global batch.
        mine = sh.shard_batch({"prompts": prompts, "lengths": lengths}, self.mesh)
        out = sh.local_rows(self.sampler(state.params, mine["prompts"], mine["lengths"], rng,
                                         self.sampling.replace(num_samples=n)))
        t_sample = time.perf_counter() - t0

        completions = [self.tokenizer.decode(out.tokens[i, :out.lengths[i]].tolist(),
                                             skip_special_tokens=True) for i in range(len(rows))]
        columns = {k: [r.get(k) for r in rows] for k in rows[0]
                   if k not in ("prompt", "prompt_ids", "messages")}
        columns["completion_lengths"] = [int(x) for x in out.lengths]
        columns["truncated"] = [bool(x) for x in out.truncated]
        total, per_fn = self.rewards([r["prompt"] for r in rows], completions, columns)
        require_some_reward(total, per_fn, [r["prompt"] for r in rows], completions)
        # Advantages and reward statistics over every process's rows (a group never spans
        # processes; batch-scaled std does): this process keeps its own block.
        everyone = sh.gather_processes({"total": total, "per_fn": per_fn, "lengths": out.lengths,
                                        "truncated": out.truncated})
        if g.multi_objective_aggregation == "normalize_then_sum":
            seq_adv_all, adv_stats = G.decoupled_advantages(
                jnp.asarray(np.stack([everyone["per_fn"][k] for k in self.rewards.names],
                                     axis=1), jnp.float32),
                jnp.asarray(self.rewards.weights, jnp.float32), g.num_generations)
        else:
            seq_adv_all, adv_stats = estimate_advantages(
                g.advantage_estimator, jnp.asarray(everyone["total"], jnp.float32), None,
                group_size=g.num_generations, scale_rewards=g.scale_rewards)
        first = jax.process_index() * len(rows)
        seq_adv = seq_adv_all[first:first + len(rows)]
        self._watch_zero_std(float(adv_stats["frac_reward_zero_std"]), everyone["per_fn"])
        batch = build_rows(prompt_ids, out.tokens, out.lengths, width, self.tokenizer.pad_id)
        mask = batch["completion_mask"]
        if g.mask_truncated_completions:
            mask = mask * (~out.truncated)[:, None]
            batch["completion_mask"] = mask.astype(np.float32)
        credit = None
        if self.credit is not None:
            credit = token_credit_weights(
                self.credit[1], self.credit[0], prompts=[r["prompt"] for r in rows],
                completions=completions, completion_ids=out.tokens, mask=mask,
                tokenizer=self.tokenizer, logprobs=out.logprobs, columns=columns)
        batch["advantages"] = np.asarray(G.token_advantages(
            seq_adv, jnp.asarray(mask), credit, self.cfg.token_credit_mode), np.float32)
        t_reward = time.perf_counter() - t0 - t_sample

        lengths_all = everyone["lengths"]
        metrics = {**reward_metrics(everyone["total"], everyone["per_fn"]),
                   "completion_length_mean": float(lengths_all.mean()),
                   "completion_length_max": float(lengths_all.max()),
                   "truncation_rate": float(everyone["truncated"].mean()),
                   "rollout_tokens_per_s": float(lengths_all.sum()) / max(t_sample, 1e-9),
                   "time_rollout_s": t_sample, "time_reward_s": t_reward}
        metrics.update({k: float(v) for k, v in adv_stats.items() if k != "reward_mean"})

        recompute_old = g.num_iterations > 1 and g.old_logprobs == "recompute"
        placed = None  # the rows on the mesh, only when a forward pass needs them
        if recompute_old or g.beta > 0:
            placed = sh.shard_batch(
                {k: batch[k] for k in ("tokens", "positions", "segment_ids")}, self.mesh)
        t1 = time.perf_counter()
        if g.num_iterations > 1:
            if g.old_logprobs == "sampler":
                batch["old_logp"] = out.logprobs.astype(np.float32)
            else:
                old = self.logprob_fn(state.params, placed)
                batch["old_logp"] = sh.local_rows(old)
                gap = np.abs(batch["old_logp"] - out.logprobs) * mask
                metrics["sampler_logprob_gap"] = float(gap.sum() / max(mask.sum(), 1))
        metrics["time_old_logprobs_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        if g.beta > 0:
            ref = self.logprob_fn(self.reference(state), placed)
            batch["ref_logp"] = sh.local_rows(ref)
        metrics["time_reference_s"] = time.perf_counter() - t2
        return batch, metrics

    def _watch_zero_std(self, frac_zero_std: float, per_fn: dict) -> None:
        """Warns (every `warn_zero_std_rollouts` batches of a streak) while no group has
        any reward spread: all advantages are 0, and only the KL term moves the policy."""
        every = self.g.warn_zero_std_rollouts
        self._zero_std_streak = self._zero_std_streak + 1 if frac_zero_std >= 1.0 else 0
        if every and self._zero_std_streak and self._zero_std_streak % every == 0:
            means = ", ".join(f"{name} {np.nanmean(r) if np.any(~np.isnan(r)) else float('nan'):.4g}"
                              for name, r in per_fn.items())
            log.warning(
                "the last %d rollout batches had no reward spread in any group "
                "(frac_reward_zero_std 1.0): each prompt's %d completions got equal rewards, "
                "so every advantage is 0 and the policy gets no reward gradient (mean rewards: "
                "%s); check the reward functions, or raise grpo.temperature / "
                "grpo.num_generations, or start from a model that sometimes succeeds",
                self._zero_std_streak, self.g.num_generations, means)

    def next_batch(self, state):
        if self._batch is None or self._uses >= self.g.num_iterations:
            self._batch, self._metrics = self._rollout(state)
            self._uses = 0
            self._rollout_state = self._prompt_state
        self._uses += 1
        batch, metrics = self._batch, dict(self._metrics)
        if self.g.num_iterations > 1:
            first = np.full((len(batch["tokens"]),), self._uses == 1, np.float32)
            batch = dict(batch, first_iteration=first)
        if self.entropy is not None:  # this step's coefficient, a traced input
            coef = np.full((len(batch["tokens"]),), self.entropy.applied(), np.float32)
            batch = dict(batch, entropy_coef=coef)
        if self._uses > 1:  # the same rollout again: no new sampling time was spent
            metrics.update({k: 0.0 for k in metrics if k.startswith("time_")})
        metrics["iteration"] = float(self._uses)
        return batch, metrics

    def data_state(self) -> dict:
        """Position of the prompt stream; a partly used rollout batch is re-sampled on
        resume (from the prompts it came from), so resume never skips prompts."""
        state = {"prompts": self.prompts.get_state() if self._batch is None or
                 self._uses >= self.g.num_iterations else self._rollout_state}
        if self.entropy is not None:
            state["entropy_controller"] = self.entropy.state()
        return state

    def set_data_state(self, state: dict) -> None:
        self.prompts.set_state(state["prompts"])
        if self.entropy is not None and "entropy_controller" in state:
            self.entropy.load(state["entropy_controller"])

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        """The loop's call after each applied step: the adaptive entropy update (TRL
        logs the coefficient the next step starts from as `entropy_coef`)."""
        del step
        if self.entropy is not None:
            self.entropy.observe(metrics["entropy_bonus/entropy"])
            metrics["entropy_coef"] = self.entropy.coef

    def evaluate(self, params, step: int) -> dict[str, float]:
        return self.evaluator(params, step)


class ReferenceSyncState(NamedTuple):
    """Optimizer state of `reference_sync`: the steps taken and the synced reference's
    copy of the trainable params (checkpointed with the optimizer state)."""

    count: jax.Array
    reference: Any


def reference_sync(alpha: float, every: int, update_masks=None,
                   ) -> optax.GradientTransformation:
    """TR-DPO's reference update as an optax transformation chained after the optimizer:
    after every `every`-th update, `ref = alpha * params + (1 - alpha) * ref` with the
    updated params (TRL's `SyncRefModelCallback` at `global_step % every == 0`). The
    updates pass through unchanged. Living in the optimizer state, the reference is
    saved and restored with every checkpoint (resume is exact) and sharded like the
    params. `update_masks` (`jaxpost.peft.partition.update_masks`) are applied to the
    updates first, as the train step does, so frozen layers of stacked leaves stay."""
    def init(params):
        return ReferenceSyncState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("reference_sync needs the params (optimizer.update(g, s, params))")
        new_params = optax.apply_updates(params, partition.apply_update_masks(updates,
                                                                              update_masks))
        count = state.count + 1
        due = count % every == 0
        ref = jax.tree.map(
            lambda r, p: jnp.where(due, alpha * p.astype(jnp.float32)
                                   + (1.0 - alpha) * r.astype(jnp.float32), r).astype(r.dtype),
            state.reference, new_params)
        return updates, ReferenceSyncState(count, ref)

    return optax.GradientTransformation(init, update)


def synced_reference(state) -> Any:
    """The params of the synced reference (`reference_sync`) held in `state.opt_state`."""
    found = [x for x in jax.tree.leaves(state.opt_state,
                                        is_leaf=lambda x: isinstance(x, ReferenceSyncState))
             if isinstance(x, ReferenceSyncState)]
    if len(found) != 1:
        raise ValueError("sync_ref_model: the optimizer state holds no reference_sync state")
    return partition.combine(state.frozen, found[0].reference)


def train(cfg: GRPOConfig):
    """Runs (or resumes) a GRPO recipe; returns the loop's result.

    With `init_sft_config`, the SFT warm-up runs (or resumes, or finds itself done)
    first; if SIGTERM stops it, its result (`preempted`) is returned right after its
    checkpoint is saved and GRPO does not start: the next run finishes the warm-up.
    """
    initialize(cfg.distributed)  # before the SFT warm-up touches a device
    model_section, warmup = sft_warmup(cfg)
    if warmup is not None and warmup.preempted:
        log.warning("preempted during the SFT warm-up: %s saved at step %d; run again "
                    "with the same workdir to finish the warm-up, then GRPO",
                    os.path.join(cfg.workdir, "sft_init"), int(warmup.state.step))
        return warmup
    tokenizer, mesh, model_cfg = setup(model_section, cfg.mesh, cfg.prompts.tokenizer,
                                       cfg.distributed)
    plan = plan_params(cfg, model_cfg, *model_init(model_section, model_cfg, mesh, cfg.seed),
                       param_logical_axes(model_cfg), mesh)
    g, wrap = cfg.grpo, None
    reference = reference_params(plan)
    if g.sync_ref_model:
        if cfg.lora.enabled:
            raise ValueError("grpo.sync_ref_model=True with LoRA: the reference is the base "
                             "with the adapters off, nothing to synchronise (TRL refuses "
                             "PEFT too); use full or partial fine-tuning")
        masks = partition.update_masks(partition.split(plan.abstract, plan.mask)[0], plan.mask)
        wrap = lambda opt: optax.chain(opt, reference_sync(  # noqa: E731
            g.ref_model_mixup_alpha, g.ref_model_sync_steps, masks))
        reference = synced_reference
    task = GRPOTask(cfg, plan.model_cfg, tokenizer, mesh, reference)
    return run_recipe(cfg, task, plan, mesh, wrap_optimizer=wrap)
