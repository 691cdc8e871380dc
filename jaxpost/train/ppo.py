"""PPO with a value head and GAE over per-token rewards (Ziegler et al. 2019; TRL's
`PPOTrainer`; the main algorithm of Galliamov et al. 2025, ALGORITHMS.md 2.2).

One rollout (`prompts_per_step` prompts x `num_generations` completions) feeds
`num_ppo_epochs` passes over `num_mini_batches` shuffled mini-batches, each one optimizer
step of the shared loop (`jaxpost.train.step`, one jit). Per rollout, host side:

1. sample with the current policy (`jaxpost.sampling.Sampler`), decode, score with the
   reward functions (`RewardSet`: verifiers, `jaxpost.rl.reward_model:from_workdir(...)`);
2. one jitted forward pass of the rollout policy gives the old log-probs *and* the values
   (`jaxpost.rl.value_head`), one of the frozen reference gives the reference log-probs;
3. per-token rewards `r_t = score_t - beta * KL_t` (`jaxpost.rl.ppo.token_rewards`): the
   sequence score on the last token, or spread over the tokens by GazeDistrib
   (`jaxpost.rl.gaze.distribute_reward` of predicted reading times, `ppo.gaze_predictor`);
   `KL_t` is k1 or k3 (`ppo.kl_estimator`); optionally whitened (`whiten_rewards`);
4. GAE (`gamma`, `lam`) -> advantages (whitened) and returns (`estimate_advantages("gae")`);
5. the adaptive KL controller updates `beta` from the rollout's KL (`kl_target > 0`).

Device side, per mini-batch: the clipped surrogate of `jaxpost.rl.grpo.policy_loss`
(token mean, `loss_type="dapo"`: TRL's `masked_mean` over the mini-batch), plus
`vf_coef` x the clipped value loss (`jaxpost.rl.ppo.value_loss`), minus `entropy_coef` x
the token entropy, all as one `(sum, token count)` pair, so gradient accumulation inside a
mini-batch is exact.

Resume. `beta` and the prompt position are the task's data state, saved with every
checkpoint: a checkpoint at a rollout boundary (`checkpoint_every` a multiple of
`num_ppo_epochs * num_mini_batches`, which is checked) resumes exactly as the straight
run; one inside a rollout re-samples that rollout from its prompts with the saved beta (as
GRPO does with `num_iterations > 1`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import sharding as sh
from jaxpost.distributed import initialize
from jaxpost.eval.generation import pad_prompts
from jaxpost.models import ModelConfig
from jaxpost.optim import OptimizerConfig
from jaxpost.peft.freeze import Rules
from jaxpost.rl import grpo as G
from jaxpost.rl import ppo
from jaxpost.rl import value_head as vh
from jaxpost.rl.advantages import estimate_advantages
from jaxpost.rl.rewards import RewardSet, require_some_reward, reward_metrics
from jaxpost.rl.rollout import build_rows
from jaxpost.sampling import Sampler, SamplingConfig
from jaxpost.train.common import (
    EvalSection,
    GenerationEval,
    ParamsPlan,
    RecipeConfig,
    model_init,
    plan_params,
    reference_params,
    run_recipe,
    setup,
    sft_warmup,
)
from jaxpost.train.grpo import PromptSection, make_logprob_fn, prompt_stream

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PPOSection:
    """PPO knobs; names and defaults follow TRL's `PPOConfig` where they exist."""

    num_generations: int = 1  # completions per prompt (PPO needs no groups; > 1 is allowed)
    prompts_per_step: int = 16  # prompts per rollout, over all processes
    max_prompt_length: int = 64  # prompts are left-truncated to this many tokens
    max_completion_length: int = 32  # completion budget (TRL: response_length)
    temperature: float = 1.0  # sampling temperature; log-probs use logits / temperature (TRL 0.7)
    top_p: float = 1.0  # nucleus sampling during rollouts
    top_k: int = 0  # top-k during rollouts (0: off)
    num_ppo_epochs: int = 4  # passes over each rollout (TRL num_ppo_epochs)
    num_mini_batches: int = 1  # optimizer steps per pass, each on 1/num_mini_batches of the rollout (TRL)
    cliprange: float = 0.2  # policy ratio clip (TRL cliprange)
    cliprange_value: float = 0.2  # how far a new value may move from the sampling-time one (TRL)
    vf_coef: float = 0.1  # weight of the value loss (TRL vf_coef)
    entropy_coef: float = 0.0  # weight of the entropy bonus (0: none, as TRL)
    gamma: float = 1.0  # discount (TRL gamma)
    lam: float = 0.95  # GAE lambda (TRL lam)
    kl_coef: float = 0.05  # beta: per-token KL penalty in the reward, the adaptive controller's start (TRL kl_coef)
    kl_estimator: Literal["k1", "k3"] = "k1"  # per-token KL estimate in the reward (TRL kl_estimator)
    kl_target: float = 0.0  # adaptive KL (Ziegler et al. 2019): target per-sequence KL (0: fixed beta)
    kl_horizon: float = 10000.0  # adaptive KL horizon, in samples
    whiten_rewards: bool = False  # whiten the per-token rewards, mean kept (TRL whiten_rewards)
    value_model: Literal["shared", "separate"] = "shared"  # value head on the policy trunk, or a separate critic (jaxpost.rl.value_head)
    value_head_init_std: float = 0.0  # std of the value head's initial kernel (0: values start at 0)
    gaze_predictor: str = ""  # GazeDistrib: "" (score on the last token), "psycholinguistic" or "regressor:WORKDIR" (jaxpost.rl.gaze)
    gaze_feature: str = "TRT"  # the predicted feature used as reading time
    gaze_temperature: float = 1.0  # softmax temperature over the reading times (1: the paper's)
    gaze_standardize: bool = True  # standardise reading times within each completion first (ALGORITHMS.md 2.2 [U])

    def __post_init__(self):
        for name in ("prompts_per_step", "num_generations", "max_prompt_length",
                     "max_completion_length", "num_ppo_epochs", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        rows = self.prompts_per_step * self.num_generations
        if rows % self.num_mini_batches:
            raise ValueError(f"num_mini_batches={self.num_mini_batches} does not divide the "
                             f"{rows} rows of a rollout (prompts_per_step x num_generations)")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={self.gamma}, "
                             f"lam={self.lam}")
        if self.kl_coef < 0 or self.kl_target < 0:
            raise ValueError(f"kl_coef and kl_target must be >= 0, got kl_coef={self.kl_coef}, "
                             f"kl_target={self.kl_target}")
        if self.kl_target > 0 and (self.kl_coef <= 0 or self.kl_horizon <= 0):
            raise ValueError("kl_target > 0 (adaptive KL) needs kl_coef > 0 (its starting "
                             f"beta) and kl_horizon > 0, got kl_coef={self.kl_coef}, "
                             f"kl_horizon={self.kl_horizon}")
        if self.kl_estimator not in ppo.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r}; expected one of "
                             f"{ppo.KL_ESTIMATORS}")
        vh.check_value_model(self.value_model)

    @property
    def steps_per_rollout(self) -> int:
        return self.num_ppo_epochs * self.num_mini_batches


@dataclasses.dataclass(frozen=True)
class PPOConfig(RecipeConfig):
    """PPO with a critic and GAE over per-token rewards (optionally gaze-distributed)."""

    trainer: str = "ppo"  # which trainer runs this config
    prompts: PromptSection = PromptSection()
    ppo: PPOSection = PPOSection()
    reward_fns: tuple[str, ...] = ("jaxpost.rl.rewards:exact_answer",)  # "pkg.module:function" or "pkg.module:factory(k=v)"
    reward_weights: tuple[float, ...] = ()  # one weight per reward function (empty: all 1.0)
    optimizer: OptimizerConfig = OptimizerConfig(lr=1e-6, schedule="constant")
    eval: EvalSection = EvalSection()
    init_sft_config: str = ""  # a recipe file: train it into WORKDIR/sft_init first when model.init_from is unset
    init_sft_steps: int = 0  # steps of that SFT warm-up (0: its own `steps`)

    identity_keys: ClassVar[tuple[str, ...]] = RecipeConfig.identity_keys + (
        "prompts.source", "prompts.split", "prompts.data_dir", "prompts.num_records",
        "prompts.tokenizer", "prompts.chat", "ppo.value_model")

    def __post_init__(self):
        super().__post_init__()
        k = self.ppo.steps_per_rollout
        if self.checkpoint_every % k:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} is not a multiple of the "
                f"{k} optimizer steps of a rollout (ppo.num_ppo_epochs x ppo.num_mini_batches): "
                "a checkpoint inside a rollout could not resume it exactly")
        if self.steps % k:
            raise ValueError(f"steps={self.steps} is not a multiple of the {k} optimizer "
                             "steps of a rollout (ppo.num_ppo_epochs x ppo.num_mini_batches)")


# ---------------------------------------------------------------------------- objective
def make_ppo_loss(model_cfg: ModelConfig, p: PPOSection):
    """`loss_fn(params, batch, rng)`: clipped surrogate + vf_coef x clipped value loss -
    entropy_coef x entropy, a token mean over the optimizer step.

    `batch` holds the rollout rows (`tokens`, `positions`, `segment_ids`,
    `completion_mask`) and, per completion token, `old_logp`, `old_values`, `advantages`
    and `returns`.
    """
    pl, cl = p.max_prompt_length, p.max_completion_length

    def loss_fn(params, batch, rng):
        logp, logits, values = vh.completion_outputs(model_cfg, params, batch, pl, cl,
                                                     p.temperature, rng)
        mask = batch["completion_mask"]
        pg_sum, count, aux = G.policy_loss(logp, batch["old_logp"], batch["advantages"], mask,
                                           loss_type="dapo", epsilon=p.cliprange)
        vf_sum, _, vf_aux = ppo.value_loss(values, batch["old_values"], batch["returns"], mask,
                                           p.cliprange_value)
        entropy = G.token_entropy(logits)
        ent_sum, _ = G.masked_mean_pair(entropy, mask)
        loss_sum = pg_sum + p.vf_coef * vf_sum - p.entropy_coef * ent_sum
        old = jax.lax.stop_gradient(jnp.where(mask > 0, batch["old_logp"], 0.0))
        log_ratio = jnp.where(mask > 0, logp - old, 0.0)
        aux.update(vf_aux)
        aux["pg_loss"] = (pg_sum, count)
        aux["value_loss"] = (vf_sum, count)
        aux["entropy"] = (ent_sum, count)
        aux["ratio_mean"] = G.masked_mean_pair(jnp.exp(log_ratio), mask)
        aux["approx_kl"] = G.masked_mean_pair(0.5 * jnp.square(log_ratio), mask)  # TRL approxkl
        aux["value_mean"] = G.masked_mean_pair(values, mask)
        return loss_sum, count, aux

    return loss_fn


def make_rollout_fn(model_cfg: ModelConfig, p: PPOSection, mesh, rules=sh.DEFAULT_RULES):
    """Jitted `(params, rows) -> (logp [N, C], values [N, C])` of the rollout policy: the
    old log-probs and the sampling-time values, from one pass when the trunk is shared."""
    def fn(params, rows):
        with sh.logical_rules(mesh, rules):
            logp, _, values = vh.completion_outputs(model_cfg, params, rows, p.max_prompt_length,
                                                    p.max_completion_length, p.temperature)
            return logp, values
    return jax.jit(fn)


# ------------------------------------------------------------------------- advantages
def rollout_advantages(scores: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
                       values: jax.Array, mask: jax.Array, beta: float, p: PPOSection,
                       score_tokens: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per-token rewards, GAE advantages (whitened) and returns of one rollout.

    Args:
      scores: `[N]` sequence scores (NaN rows must already be masked out).
      old_logp, ref_logp: `[N, T]` rollout-policy and reference log-probs (`ref_logp` None:
        no KL term).
      values: `[N, T]` sampling-time values.
      mask: `[N, T]`.
      beta: the KL coefficient of this rollout.
      p: the PPO section (`kl_estimator`, `whiten_rewards`, `gamma`, `lam`).
      score_tokens: `[N, T]` the score already distributed over tokens (GazeDistrib).

    Returns:
      `advantages`, `returns`, `rewards`, `kl` (`[N, T]`) and scalar stats.
    """
    mask = jnp.asarray(mask, jnp.float32)
    kl = (jnp.zeros_like(mask) if ref_logp is None else
          ppo.kl_per_token(old_logp, ref_logp, mask, p.kl_estimator))
    if score_tokens is None:
        rewards = ppo.token_rewards(kl, mask, beta, scores=scores)
    else:
        rewards = ppo.token_rewards(kl, mask, beta, score_tokens=score_tokens)
    if p.whiten_rewards:
        rewards = ppo.whiten(rewards, mask, shift_mean=False)
    adv, stats = estimate_advantages("gae", scores, mask, token_rewards=rewards, values=values,
                                     gamma=p.gamma, lam=p.lam)
    returns = stats.pop("returns")
    rows = jnp.maximum(jnp.sum(jnp.sum(mask, -1) > 0), 1.0)
    kl_seq = jnp.sum(kl, -1)
    out = {"advantages": adv, "returns": returns, "rewards": rewards, "kl": kl,
           "kl_seq": jnp.sum(kl_seq) / rows,
           "kl_token": jnp.sum(kl) / jnp.maximum(jnp.sum(mask), 1.0),
           "non_score_reward": -beta * jnp.sum(kl_seq) / rows,
           "explained_variance": ppo.explained_variance(values, returns, mask)}
    out.update(stats)
    return out


def gaze_score_tokens(predictor, tokenizer, completion_ids: np.ndarray, scores: np.ndarray,
                      mask: np.ndarray, p: PPOSection) -> np.ndarray:
    """GazeDistrib: each row's score spread over its tokens by predicted reading time,
    `[N, T]` (`jaxpost.rl.gaze.distribute_reward` of `jaxpost.rl.gaze.reading_times`; rows
    without tokens get 0). Each row sums to its score."""
    from jaxpost.rl import gaze  # lazy: only gaze-distributed runs need it

    times = gaze.reading_times(predictor, tokenizer, completion_ids, mask, p.gaze_feature)
    keep = mask.sum(-1) > 0
    out = np.zeros(mask.shape, np.float32)
    if keep.any():
        out[keep] = np.asarray(gaze.distribute_reward(
            scores[keep], times[keep], mask[keep], p.gaze_temperature,
            standardize_times=p.gaze_standardize))
    return out


# ------------------------------------------------------------------------------- task
class PPOTask:
    """Rollouts with the current policy, each feeding `num_ppo_epochs x num_mini_batches`
    optimizer steps on shuffled mini-batches."""

    def __init__(self, cfg: PPOConfig, model_cfg: ModelConfig, tokenizer, mesh,
                 reference: Callable[[Any], Any] | None = None):
        p = cfg.ppo
        self.prompts = prompt_stream(cfg.prompts, tokenizer, p.prompts_per_step, cfg.seed,
                                     "ppo")
        self.rewards = RewardSet(cfg.reward_fns, cfg.reward_weights or None)
        self.cfg, self.p, self.tokenizer, self.mesh = cfg, p, tokenizer, mesh
        self.loss_fn = make_ppo_loss(model_cfg, p)
        self.sampler = Sampler(model_cfg, mesh)
        self.sampling = SamplingConfig(
            max_new_tokens=p.max_completion_length, temperature=p.temperature, top_p=p.top_p,
            top_k=p.top_k, pad_id=tokenizer.pad_id,
            eos_ids=model_cfg.eos_token_ids or (tokenizer.eos_id,))
        self.rollout_fn = make_rollout_fn(model_cfg, p, mesh)
        self.logprob_fn = make_logprob_fn(model_cfg, p, mesh)  # the reference's log-probs
        self.reference = reference  # state -> the starting policy's params (KL anchor)
        if p.kl_coef > 0 and reference is None:
            raise ValueError("ppo.kl_coef > 0 needs a reference policy (train() builds it)")
        self.gaze = None  # the reading-time predictor of GazeDistrib
        if p.gaze_predictor:
            from jaxpost.rl import gaze  # lazy: only gaze-distributed runs need it

            self.gaze = gaze.load_predictor(p.gaze_predictor)
            if p.gaze_feature not in self.gaze.features:
                raise ValueError(f"ppo.gaze_feature={p.gaze_feature!r} is not predicted by "
                                 f"{self.gaze!r} (it predicts {self.gaze.features})")
        self.evaluator = GenerationEval(cfg.eval, model_cfg, tokenizer, mesh, cfg.seed)
        self.beta = float(p.kl_coef)  # the KL controller's coefficient (data state)
        self._batch, self._metrics, self._uses = None, {}, 0
        self._rollout_state = self.data_state()

    # -- rollout ----------------------------------------------------------------------
    def _rollout(self, state) -> tuple[dict, dict]:
        p = self.p
        t0 = time.perf_counter()
        records = next(self.prompts)
        rows = [r for r in records for _ in range(p.num_generations)]
        prompt_ids = [r["prompt_ids"][-p.max_prompt_length:] for r in rows]
        prompts, lengths = pad_prompts(prompt_ids, self.tokenizer.pad_id,
                                       width=p.max_prompt_length)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)
        params = state.params
        out = jax.device_get(self.sampler(vh.policy_params(params), prompts, lengths, rng,
                                          self.sampling))
        t_sample = time.perf_counter() - t0

        completions = [self.tokenizer.decode(out.tokens[i, :out.lengths[i]].tolist(),
                                             skip_special_tokens=True) for i in range(len(rows))]
        columns = {k: [r.get(k) for r in rows] for k in rows[0]
                   if k not in ("prompt", "prompt_ids", "messages")}
        columns["completion_lengths"] = [int(x) for x in out.lengths]
        columns["truncated"] = [bool(x) for x in out.truncated]
        texts = [r["prompt"] for r in rows]
        total, per_fn = self.rewards(texts, completions, columns)
        require_some_reward(total, per_fn, texts, completions)
        batch = build_rows(prompt_ids, out.tokens, out.lengths, p.max_prompt_length,
                           self.tokenizer.pad_id)
        # A row no reward function scored takes no part in the update.
        batch["completion_mask"] = batch["completion_mask"] * (~np.isnan(total))[:, None]
        mask = batch["completion_mask"]
        scores = np.nan_to_num(np.asarray(total, np.float32))
        score_tokens = None
        if self.gaze is not None:
            score_tokens = gaze_score_tokens(self.gaze, self.tokenizer, out.tokens, scores,
                                             mask, p)
        t_reward = time.perf_counter() - t0 - t_sample

        t1 = time.perf_counter()
        placed = sh.shard_batch({k: batch[k] for k in ("tokens", "positions", "segment_ids")},
                                self.mesh)
        old_logp, values = jax.device_get(self.rollout_fn(params, placed))
        ref_logp = None
        if self.reference is not None and (self.beta > 0 or p.kl_target > 0):
            ref_logp = jax.device_get(self.logprob_fn(self.reference(state), placed))
        t_forward = time.perf_counter() - t1

        beta = self.beta
        adv = jax.device_get(rollout_advantages(
            scores, old_logp, ref_logp, values, mask, beta, p,
            None if score_tokens is None else jnp.asarray(score_tokens)))
        if p.kl_target > 0:  # Ziegler et al.'s controller, on this rollout's KL
            n = len(rows) * jax.process_count()
            self.beta = float(ppo.adaptive_kl_coef(beta, adv["kl_seq"], n, p.kl_target,
                                                   p.kl_horizon))
        batch.update(old_logp=np.asarray(old_logp, np.float32),
                     old_values=np.asarray(values, np.float32) * mask,
                     advantages=np.asarray(adv["advantages"], np.float32),
                     returns=np.asarray(adv["returns"], np.float32))

        metrics = {**reward_metrics(total, per_fn),
                   "kl": float(adv["kl_token"]), "kl_seq": float(adv["kl_seq"]),
                   "kl_coef": beta, "non_score_reward": float(adv["non_score_reward"]),
                   "explained_variance": float(adv["explained_variance"]),
                   "advantages_mean": float(adv["advantages_mean"]),
                   "advantages_std": float(adv["advantages_std"]),
                   "returns_mean": _masked_mean(adv["returns"], mask),
                   "rollout_value_mean": _masked_mean(values, mask),
                   "completion_length_mean": float(out.lengths.mean()),
                   "completion_length_max": float(out.lengths.max()),
                   "truncation_rate": float(out.truncated.mean()),
                   "frac_reward_none": float(np.mean(np.isnan(total))),
                   "rollout_tokens_per_s": float(out.lengths.sum()) / max(t_sample, 1e-9),
                   "time_rollout_s": t_sample, "time_reward_s": t_reward,
                   "time_forward_s": t_forward}
        return batch, metrics

    def next_batch(self, state):
        p = self.p
        if self._batch is None or self._uses >= p.steps_per_rollout:
            self._rollout_state = self.data_state()
            self._rollout_index = int(jax.device_get(state.step)) // p.steps_per_rollout
            self._batch, self._metrics = self._rollout(state)
            self._uses = 0
        epoch, j = divmod(self._uses, p.num_mini_batches)
        self._uses += 1
        n = len(self._batch["tokens"])
        size = n // p.num_mini_batches
        # A fresh shuffle per epoch, a function of (seed, rollout, epoch): resumable.
        order = np.random.default_rng(
            (self.cfg.seed, self._rollout_index, epoch, jax.process_index())).permutation(n)
        rows = np.sort(order[j * size:(j + 1) * size])
        batch = {k: v[rows] for k, v in self._batch.items()}
        metrics = dict(self._metrics)
        if self._uses > 1:  # the same rollout again: no new sampling time was spent
            metrics.update({k: 0.0 for k in metrics if k.startswith("time_")})
        metrics["ppo_epoch"] = float(epoch)
        return batch, metrics

    def data_state(self) -> dict:
        """The prompt position and the KL controller's beta; inside a rollout, those from
        before it (the rollout is re-sampled on resume)."""
        if self._batch is not None and self._uses < self.p.steps_per_rollout:
            return self._rollout_state
        return {"prompts": self.prompts.get_state(), "kl_coef": self.beta}

    def set_data_state(self, state: dict) -> None:
        self.prompts.set_state(state["prompts"])
        self.beta = float(state.get("kl_coef", self.p.kl_coef))

    def evaluate(self, params, step: int) -> dict[str, float]:
        return self.evaluator(vh.policy_params(params), step)


def _masked_mean(x, mask) -> float:
    m = np.asarray(mask) > 0
    return float(np.asarray(x)[m].mean()) if m.any() else float("nan")


# ------------------------------------------------------------------------------- train
def params_plan(cfg: PPOConfig, model_cfg: ModelConfig, policy_init: Callable[[], Any],
                mesh) -> ParamsPlan:
    """The policy + value-head params of a PPO run under the recipe's freeze / LoRA keys.

    The value head (a separate critic's head) trains unless a `freeze` pattern names it
    (`score.` / `critic.score.`), also under LoRA and `trainable` rules, which otherwise
    freeze what they do not name: a LoRA policy keeps a full value head. A separate
    critic's trunk follows the same rules as the policy (names `critic.model.*`).
    """
    p = cfg.ppo
    abstract = vh.value_param_shapes(model_cfg, p.value_model)
    shardings = vh.value_param_shardings(model_cfg, mesh, p.value_model)
    head_rng = jax.random.fold_in(jax.random.key(cfg.seed), 3)

    def init():
        return jax.jit(lambda policy: vh.init_value_params(
            model_cfg, policy, p.value_model, head_rng, p.value_head_init_std),
            out_shardings=shardings)(policy_init())

    keep = r"^score\." if p.value_model == "shared" else r"^critic\.score\."
    return plan_params(cfg, model_cfg, init, abstract, shardings,
                       vh.value_param_logical_axes(model_cfg, p.value_model), mesh,
                       extra_rules=Rules(keep=((keep, "value head"),)))


def train(cfg: PPOConfig):
    """Runs (or resumes) a PPO recipe; returns the loop's result (an SFT warm-up first
    when `init_sft_config` is set, as in GRPO)."""
    initialize(cfg.distributed)  # before the SFT warm-up touches a device
    model_section, warmup = sft_warmup(cfg)
    if warmup is not None and warmup.preempted:
        log.warning("preempted during the SFT warm-up: run again with the same workdir to "
                    "finish it, then PPO")
        return warmup
    tokenizer, mesh, model_cfg = setup(model_section, cfg.mesh, cfg.prompts.tokenizer,
                                       cfg.distributed)
    plan = params_plan(cfg, model_cfg, model_init(model_section, model_cfg, mesh, cfg.seed)[0],
                       mesh)
    full_reference = reference_params(plan)
    task = PPOTask(cfg, plan.model_cfg, tokenizer, mesh,
                   lambda state: vh.policy_params(full_reference(state)))
    return run_recipe(cfg, task, plan, mesh,
                      ppo={"policy": vh.POLICY, "value_model": cfg.ppo.value_model,
                           "head": vh.HEAD, "critic": vh.CRITIC})


__all__ = ["PPOConfig", "PPOSection", "PPOTask", "gaze_score_tokens", "make_ppo_loss",
           "make_rollout_fn",
           "params_plan", "rollout_advantages", "train"]
