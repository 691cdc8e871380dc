"""GRPO against TRL 1.16 itself: `GRPOTrainer.compute_loss` vs jaxpost's loss through its
train step, on one tiny random Llama (saved with `save_pretrained`, loaded by
`jaxpost.models.from_hf`) and one fixed batch: equal-length prompts, ragged completions,
old and reference log-probs that differ from the policy.

The trainers are real `trl.GRPOTrainer`s, built offline from the local model and
tokenizer objects and a tiny in-memory dataset (`beta=0` at construction, so no reference
model is loaded; the loss reads the reference log-probs from its inputs). One trainer per
temperature (the fused LM head takes it at construction); every other knob is set on the
trainer (or its `args`) per case, exactly where `_compute_loss` reads it. Two
micro-batches are two `compute_loss` + `backward` calls with
`current_gradient_accumulation_steps = 2` on the strided rows jaxpost's
`split_microbatches` takes. GDPO's advantages come from TRL's own
`_generate_and_score_completions` with generation and reward calls replaced by the fixed
batch. Skipped without TRL 1.16.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

trl = pytest.importorskip("trl")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
if not trl.__version__.startswith("1.16."):
    pytest.skip(f"these parity tests pin TRL 1.16 (found {trl.__version__})",
                allow_module_level=True)

from jaxpost.models import from_hf  # noqa: E402
from jaxpost.rl import grpo as G  # noqa: E402
from jaxpost.rl.rollout import build_rows  # noqa: E402
from jaxpost.train.grpo import EntropyController, GRPOSection, make_grpo_loss  # noqa: E402
from jaxpost.train.state import TrainState  # noqa: E402
from jaxpost.train.step import train_step  # noqa: E402
from tests.tokenizer_testing import make_hf_tokenizer_dir  # noqa: E402

pytestmark = pytest.mark.slow

N, GROUP, P, C = 8, 4, 5, 6
LENGTHS = np.array([6, 2, 5, 3, 6, 1, 4, 6])
RTOL = 1e-4
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


@dataclasses.dataclass(frozen=True)
class Case:
    loss_type: str = "dapo"
    temperature: float = 1.0
    epsilon_high: float | None = None
    beta: float = 0.0
    use_bias_correction_kl: bool = True
    importance_sampling_level: str = "token"
    delta: float | None = None
    micro: int = 1
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    entropy_coef: float = 0.0

    def __str__(self):
        short = {"temperature": "T", "epsilon_high": "eh", "beta": "b",
                 "use_bias_correction_kl": "klcorr", "importance_sampling_level": "is",
                 "delta": "delta", "micro": "micro", "top_entropy_quantile": "topH",
                 "off_policy_mask_threshold": "opm", "entropy_coef": "Hcoef"}
        default = Case()
        return "-".join([self.loss_type] + [
            f"{short[f.name]}{getattr(self, f.name)}" for f in dataclasses.fields(self)
            if f.name in ("temperature", "epsilon_high", "beta")
            or getattr(self, f.name) != getattr(default, f.name) and f.name != "loss_type"])


def _grid():
    # Every loss type x (beta 0 | 0.04 with the KL correction on | off) x two
    # (temperature, epsilon_high) points; the full temperature x epsilon_high product on
    # dapo (each case costs ~1 s of CPU, eager; the slow-test budget is ~2 min in all).
    for lt in LOSS_TYPES:
        level = "sequence" if lt == "luspo" else "token"
        high = 5.0 if lt == "cispo" else 0.28  # CISPO's epsilon_high is the weight cap
        points = ((1.0, None), (0.7, high), (1.0, high), (0.7, None)) if lt == "dapo" \
            else ((1.0, None), (0.7, high))
        for temp, eps_high in points:
            for beta, corr in ((0.0, True), (0.04, True), (0.04, False)):
                yield Case(lt, temp, eps_high, beta, corr, level)
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "vespo"):  # two micro-batches
        yield Case(lt, 0.7, None, 0.04, True, "sequence" if lt == "luspo" else "token", micro=2)
    for lt in ("grpo", "dapo"):  # delta (INTELLECT-2)
        yield Case(lt, 1.0, 0.28, 0.04, True, delta=1.5)
    for lt in ("grpo", "dapo", "cispo", "sapo"):  # GSPO
        yield Case(lt, 1.0, 0.28, 0.04, True, "sequence")
    yield Case("grpo", 1.0, None, 0.04, True, "sequence", micro=2)
    yield Case("dapo", 1.0, 0.28, 0.04, True, top_entropy_quantile=0.4)
    yield Case("grpo", 0.7, None, 0.0, True, top_entropy_quantile=0.2, micro=2)
    yield Case("dapo", 1.0, None, 0.04, True, off_policy_mask_threshold=0.02)
    yield Case("grpo", 1.0, None, 0.0, True, off_policy_mask_threshold=0.02,
               importance_sampling_level="sequence")
    for lt in ("grpo", "dapo", "luspo"):
        yield Case(lt, 1.0, None, 0.04, True, "sequence" if lt == "luspo" else "token",
                   entropy_coef=0.05)
    yield Case("grpo", 1.0, None, 0.0, True, entropy_coef=0.05, top_entropy_quantile=0.5,
               micro=2)


CASES = list(_grid())


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny model (saved and loaded by both sides), the tokenizer and the batch."""
    root = tmp_path_factory.mktemp("trl_parity")
    tok = transformers.AutoTokenizer.from_pretrained(make_hf_tokenizer_dir(root / "tok"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    hf = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    hf.save_pretrained(root / "model")
    model_cfg, params = from_hf(root / "model")

    rng = np.random.default_rng(0)
    prompts = rng.integers(5, len(tok), (N // GROUP, P)).repeat(GROUP, axis=0)
    completion = rng.integers(5, len(tok), (N, C))
    mask = (np.arange(C)[None] < LENGTHS[:, None]).astype(np.float32)
    completion = np.where(mask > 0, completion, tok.pad_token_id)
    return {"root": root, "tok": tok, "model_cfg": model_cfg, "params": params,
            "prompts": prompts, "completion": completion, "mask": mask, "rng": rng}


def _trainer(world, temperature, **kw):
    model = transformers.LlamaForCausalLM.from_pretrained(world["root"] / "model")
    reward_funcs = kw.pop("reward_funcs", None) or [lambda completions, **_: [0.0] * len(completions)]
    args = trl.GRPOConfig(
        output_dir=str(world["root"] / f"out{temperature}"), per_device_train_batch_size=N,
        num_generations=GROUP, max_completion_length=C, temperature=temperature, beta=0.0,
        report_to=[], use_cpu=True, bf16=False, logging_steps=1, **kw)
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, processing_class=world["tok"],
        train_dataset=datasets.Dataset.from_dict({"prompt": ["hello world"] * N}))
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def trainers(world):
    return {t: _trainer(world, t) for t in (1.0, 0.7)}


@pytest.fixture(scope="module")
def batches(world, trainers):
    """Per temperature: the policy's log-probs (from TRL's forward), old = policy + noise,
    ref = policy + noise, and advantages."""
    out = {}
    rng = np.random.default_rng(1)
    adv = rng.normal(size=N).astype(np.float32)
    old_noise = rng.normal(0, 0.3, (N, C)).astype(np.float32)
    old_noise[3] += 0.3  # a row with A < 0 far off-policy: the off-policy mask drops it
    ref_noise = rng.normal(0, 0.2, (N, C)).astype(np.float32)
    for t, tr in trainers.items():
        with torch.no_grad():
            ids = torch.tensor(np.concatenate([world["prompts"], world["completion"]], 1))
            att = torch.tensor(np.concatenate([np.ones((N, P)), world["mask"]], 1), dtype=torch.long)
            logp, _, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, att, C)
        logp = logp.numpy()
        out[t] = {"logp": logp, "old": (logp + old_noise) * world["mask"],
                  "ref": (logp + ref_noise) * world["mask"], "adv": adv}
    return out


# ---------------------------------------------------------------------------- the two sides
def _trl_loss(tr, world, b, case: Case):
    """Loss, gradient norm and the logged metrics of TRL's compute_loss on the batch."""
    tr.loss_type = case.loss_type
    tr.beta = case.beta
    tr.epsilon_low = 0.2
    tr.epsilon_high = 0.2 if case.epsilon_high is None else case.epsilon_high
    tr.importance_sampling_level = case.importance_sampling_level
    tr.top_entropy_quantile = case.top_entropy_quantile
    tr.off_policy_mask_threshold = case.off_policy_mask_threshold
    tr.entropy_coef = case.entropy_coef
    tr._entropy_bonus_enabled = case.entropy_coef != 0.0
    tr.args.use_bias_correction_kl = case.use_bias_correction_kl
    tr.args.delta = case.delta
    tr.args.steps_per_generation = case.micro
    tr.current_gradient_accumulation_steps = case.micro
    tr._metrics["train"].clear()
    tr.model.zero_grad()
    mask = world["mask"]
    total, metrics_w = 0.0, []
    for j in range(case.micro):
        rows = slice(j, None, case.micro)  # jaxpost's strided micro-batches
        inputs = {
            "prompt_ids": torch.tensor(world["prompts"][rows]),
            "prompt_mask": torch.ones((len(world["prompts"][rows]), P), dtype=torch.long),
            "completion_ids": torch.tensor(world["completion"][rows]),
            "completion_mask": torch.tensor(mask[rows]),
            "advantages": torch.tensor(b["adv"][rows]),
            "old_per_token_logps": torch.tensor(b["old"][rows]),
            "ref_per_token_logps": torch.tensor(b["ref"][rows]),
            "num_items_in_batch": torch.tensor(float(mask.sum())),
        }
        loss = tr.compute_loss(tr.model, inputs)
        loss.backward()
        total += float(loss.detach())
        metrics_w.append((mask[rows].sum(), mask[rows].shape[0]))
    grad_norm = math.sqrt(sum(float((p.grad.double() ** 2).sum())
                              for p in tr.model.parameters() if p.grad is not None))
    metrics = {}
    for name, values in tr._metrics["train"].items():
        if len(values) != case.micro:
            continue
        # TRL logs the mean over micro-batches of per-micro-batch means; jaxpost logs the
        # mean over the step's tokens (rows for sequence-level values): weight them so.
        row_level = case.importance_sampling_level == "sequence" and name.startswith(
            ("clip_ratio", "cispo")) or name.startswith("vespo")
        w = np.array([rw if row_level else tw for tw, rw in metrics_w], np.float64)
        if name == "policy_loss":  # the micro-batch's loss: grpo-style, a mean over rows
            w = np.ones(case.micro)
        metrics[name] = float(np.dot(values, w) / w.sum())
    return total, grad_norm, metrics


def _jax_step(model_cfg, section: GRPOSection, micro: int):
    # Eager (jax.disable_jit): ~100 configurations would otherwise compile ~100 programs,
    # minutes of CPU; op by op the same train step takes a fraction of a second here.
    step = functools.partial(train_step, loss_fn=make_grpo_loss(model_cfg, section),
                             optimizer=optax.sgd(0.0), grad_accum_steps=micro)

    def run(state, batch):
        with jax.disable_jit():
            return step(state, batch)
    return run


def _section(case: Case) -> GRPOSection:
    return GRPOSection(
        num_generations=GROUP, prompts_per_step=N // GROUP, max_prompt_length=P,
        max_completion_length=C, temperature=case.temperature, beta=case.beta,
        epsilon=0.2, epsilon_high=case.epsilon_high or 0.0, delta=case.delta or 0.0,
        loss_type=case.loss_type, num_iterations=2, use_bias_correction_kl=case.use_bias_correction_kl,
        importance_sampling_level=case.importance_sampling_level,
        top_entropy_quantile=case.top_entropy_quantile,
        off_policy_mask_threshold=case.off_policy_mask_threshold or 0.0,
        entropy_coef=case.entropy_coef)


def _jax_batch(world, b, entropy_coef=0.0):
    batch = build_rows([list(p) for p in world["prompts"]], world["completion"], LENGTHS, P,
                       world["tok"].pad_token_id)
    mask = batch["completion_mask"]
    batch.update(advantages=(b["adv"][:, None] * mask).astype(np.float32),
                 old_logp=b["old"].astype(np.float32), ref_logp=b["ref"].astype(np.float32),
                 first_iteration=np.zeros((N,), np.float32))
    if entropy_coef:
        batch["entropy_coef"] = np.full((N,), entropy_coef, np.float32)
    return batch


def _jax_loss(world, b, case: Case):
    step = _jax_step(world["model_cfg"], _section(case), case.micro)
    state = TrainState.create(world["params"], optax.sgd(0.0), seed=0)
    _, metrics = step(state, _jax_batch(world, b, case.entropy_coef))
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES, ids=str)
def test_grpo_loss_gradient_and_metrics_match_trl(world, trainers, batches, case):
    b = batches[case.temperature]
    loss, grad_norm, trl_metrics = _trl_loss(trainers[case.temperature], world, b, case)
    ours = _jax_loss(world, b, case)
    assert loss != 0.0 and grad_norm > 0.0
    np.testing.assert_allclose(ours["loss"], loss, rtol=RTOL, atol=1e-7, err_msg="loss")
    np.testing.assert_allclose(ours["grad_norm"], grad_norm, rtol=RTOL, err_msg="grad_norm")
    expected = {"kl", "entropy"} if case.beta else {"entropy"}
    if case.loss_type in ("cispo",):
        expected.add("cispo_clip_ratio")
    elif case.loss_type == "vespo":
        expected.add("vespo/phi_seq_mean")
    elif case.loss_type != "sapo":
        expected |= {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
    assert expected <= set(trl_metrics), sorted(trl_metrics)
    for name in sorted(expected):
        np.testing.assert_allclose(ours[name], trl_metrics[name], rtol=RTOL, atol=1e-7,
                                   err_msg=name)
    if case.entropy_coef:
        np.testing.assert_allclose(ours["policy_loss"], trl_metrics["policy_loss"], rtol=RTOL)


def test_some_cases_clip_and_mask_something(world, batches):
    """The batch is not a degenerate one where the clip, the cap and the masks are idle."""
    b = batches[1.0]
    ratio = np.exp(b["logp"] - b["old"])[world["mask"] > 0]
    assert (ratio > 1.28).any() and (ratio < 0.8).any() and (ratio > 1.5).any()
    kl = ((b["old"] - b["logp"]) * world["mask"]).sum(1) / world["mask"].sum(1)
    assert ((kl > 0.02) & (b["adv"] < 0)).any() and ((kl <= 0.02) | (b["adv"] >= 0)).any()


def test_adaptive_entropy_controller_matches_trl(world, trainers, batches):
    """Skywork-OR1's controller over three steps: TRL's `entropy_coef` after each step vs
    jaxpost's `EntropyController` fed the step's `entropy_bonus/entropy` metric."""
    tr, b = trainers[1.0], batches[1.0]
    case = Case("dapo", 1.0, None, 0.0, entropy_coef=0.1)
    ours = EntropyController(dataclasses.replace(_section(case), use_adaptive_entropy=True,
                                                 entropy_target=10.0, entropy_coef_delta=0.03,
                                                 entropy_coef_max=0.15))
    tr.use_adaptive_entropy = True
    tr.args.entropy_target, tr.args.entropy_coef_delta, tr.args.entropy_coef_max = 10.0, 0.03, 0.15
    tr._last_world_entropy, tr._entropy_window_stats = float("inf"), None
    tr.entropy_coef = 0.1
    try:
        for _ in range(3):
            applied = ours.applied()
            loss, _, m = _trl_loss(tr, world, b, dataclasses.replace(case, entropy_coef=tr.entropy_coef))
            jm = _jax_loss(world, b, dataclasses.replace(case, entropy_coef=applied or 1e-30))
            np.testing.assert_allclose(jm["loss"], loss, rtol=RTOL)
            ours.observe(jm["entropy_bonus/entropy"])
            np.testing.assert_allclose(ours.coef, tr.entropy_coef, rtol=1e-6)
            np.testing.assert_allclose(ours.last_entropy, tr._last_world_entropy, rtol=RTOL)
        assert ours.coef == pytest.approx(0.15)  # rose by delta twice, then capped
    finally:
        tr.use_adaptive_entropy = False


def _trl_advantages(world, rewards_per_func, weights, aggregation, scale_rewards="group"):
    """TRL's own advantages: `_generate_and_score_completions` on the fixed batch, with
    generation and the reward calls replaced by it."""
    k = rewards_per_func.shape[1]
    funcs = [functools.partial(lambda completions, **_: [0.0] * len(completions)) for _ in range(k)]
    for i, f in enumerate(funcs):
        f.__name__ = f"r{i}"
    tr = _trainer(world, 1.0, reward_weights=list(weights),
                  multi_objective_aggregation=aggregation, scale_rewards=scale_rewards,
                  reward_funcs=funcs)
    prompt_ids = [list(map(int, p)) for p in world["prompts"]]
    completion_ids = [list(map(int, c[:n])) for c, n in zip(world["completion"], LENGTHS)]
    tr._generate = lambda prompts: (prompt_ids, completion_ids, None, ["x"] * N, None, {},
                                    None, None)
    tr._calculate_rewards = lambda *a, **kw: torch.tensor(rewards_per_func, dtype=torch.float32)
    out = tr._generate_and_score_completions([{"prompt": "hello world"}] * N)
    return out["advantages"].numpy(), tr._metrics["train"]


@pytest.mark.parametrize("aggregation", ["normalize_then_sum", "sum_then_normalize"])
def test_multi_reward_advantages_match_trl(world, aggregation):
    """GDPO (`normalize_then_sum`) and the summed default, two rewards with weights, a
    None reward, a row no function scores and a group where one reward is flat."""
    r = np.array([[1, 0.2], [0, 0.5], [1, np.nan], [0, 0.1],
                  [1, 0.3], [1, 0.3], [np.nan, np.nan], [1, 0.9]], np.float32)
    weights = (1.0, 0.5)
    expected, _ = _trl_advantages(world, r, weights, aggregation)
    if aggregation == "normalize_then_sum":
        ours, _ = G.decoupled_advantages(r, jnp.asarray(weights), GROUP)
    else:
        total = np.where(np.isnan(r).all(1), np.nan, np.nansum(r * np.asarray(weights), 1))
        ours, _ = G.group_advantages(total.astype(np.float32), GROUP, "group")
    chex.assert_trees_all_close(np.asarray(ours), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected).max() > 0.5
