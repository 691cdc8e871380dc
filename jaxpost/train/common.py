"""What every recipe shares: its base config (model, optimizer, mesh, which params
train, LoRA), and how those sections become a model config, params and a loop run."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, ClassVar

import jax

from jaxpost import sharding as sh
from jaxpost.checkpoint import latest_run_step, open_run, run_metadata
from jaxpost.data import synthetic
from jaxpost.distributed import DistributedConfig, initialize
from jaxpost.eval.generation import generation_accuracy
from jaxpost.models import ModelConfig, from_hf, init_params, param_shapes, preset
from jaxpost.models.config import PRESETS
from jaxpost.models.hf import hf_model_config
from jaxpost.optim import OptimizerConfig, make_optimizer, make_schedule
from jaxpost.peft import lora as L
from jaxpost.peft.alignguard import ALIGN_SUFFIX, uses_align_adapter
from jaxpost.peft import partition
from jaxpost.peft.freeze import Mask, Rules, make_rules, trainable_mask
from jaxpost.sampling import Sampler, SamplingConfig
from jaxpost.train.loop import LoopConfig, run

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to train: an HF folder, a preset, or the shape fields below."""

    hf_path: str = ""  # local Hugging Face folder (config.json + safetensors); wins over preset
    init_from: str = ""  # a jaxpost workdir: start from the params of its latest checkpoint
    init_step: int = 0  # with init_from: the checkpoint step to take (0 = the latest)
    preset: str = ""  # a name in jaxpost.models.PRESETS ("" = build from the fields below)
    family: str = "llama"  # "llama", "qwen2" or "qwen3" (when neither hf_path nor preset)
    vocab_size: int = 0  # 0 = the tokenizer's vocabulary size
    hidden_size: int = 128  # model width
    intermediate_size: int = 384  # SwiGLU inner width
    num_layers: int = 4  # decoder layers
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA)
    head_dim: int = 32  # per-head width
    tie_embeddings: bool = False  # share embed_tokens and lm_head
    rope_theta: float = 10000.0  # RoPE base
    max_position_embeddings: int = 2048  # longest position the model is meant for
    dtype: str = "float32"  # compute dtype ("bfloat16" for mixed precision)
    param_dtype: str = "float32"  # master-weight dtype
    scan_layers: bool | None = None  # lax.scan over layers; False: unrolled; None: unrolled on CPU only
    remat_policy: str = "none"  # "none", "full", "dots", "dots_with_no_batch_dims"

    def __post_init__(self):
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"model.preset={self.preset!r}; known presets: {sorted(PRESETS)}")


def _at_least(section, minimum: int, *names: str) -> None:
    """Raises ValueError naming the first of `names` whose value is below `minimum`."""
    for name in names:
        value = getattr(section, name)
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Generation-based evaluation on held-out prompts (recipes with a checker)."""

    task: str = ""  # "" for none, or a synthetic source spec ("synthetic:addition[:D]"): held-out exact match
    num_prompts: int = 200  # held-out prompts per evaluation
    batch_size: int = 50  # prompts per sampler call
    max_new_tokens: int = 8  # completion budget
    temperature: float = 0.0  # 0: greedy; > 0: sampled, accuracy averaged over num_samples (avg@k)
    num_samples: int = 1  # completions per prompt when sampling (DAPO reports avg@32 at T=1)
    drift_prompts: int = 0  # alignment drift eval (jaxpost.eval.drift): held-out prompts per jaxpost.data.alignment category, judged for refusal; logs refusal_rate (unsafe) and answer_rate (safe), writes WORKDIR/drift.json (first evaluation vs latest); 0: off
    drift_judge: str = "phrases"  # "phrases" (refusal-phrase match) or a judge spec "pkg.module:factory(k=v)", e.g. "jaxpost.eval.drift:reward_model_judge(workdir='/tmp/rm')"
    drift_max_new_tokens: int = 16  # completion budget of the drift eval (a refusal phrase opens the reply)

    def __post_init__(self):
        if self.task:
            synthetic.parse_spec(self.task)
        _at_least(self, 1, "num_prompts", "batch_size", "max_new_tokens", "num_samples",
                  "drift_max_new_tokens")
        _at_least(self, 0, "drift_prompts")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")


class GenerationEval:
    """Generation on held-out prompts: the task's checker (`task`), and the alignment
    drift eval (`drift_prompts`), whose report goes to `workdir`/drift.json."""

    def __init__(self, section: EvalSection, model_cfg: ModelConfig, tokenizer, mesh, seed: int,
                 workdir: str = ""):
        self.section, self.tokenizer, self.seed = section, tokenizer, seed
        wanted = section.task or section.drift_prompts
        self.sampler = Sampler(model_cfg, mesh) if wanted else None
        self._prompts = None
        self._drift = None
        self.workdir = workdir

    def __call__(self, params, step: int) -> dict[str, float]:
        out = self._task(params) if self.section.task else {}
        if self.section.drift_prompts:
            out.update(self._drift_eval(params, step))
        return out

    def _drift_eval(self, params, step: int) -> dict[str, float]:
        """Refusal / answer rates (overall and `refusal_rate/CATEGORY`...); with a
        workdir, drift.json keeps every evaluated step and compares the first with this."""
        from jaxpost.data import alignment
        from jaxpost.eval import drift

        e = self.section
        if self._drift is None:
            self._drift = drift.DriftEval(
                self.sampler, self.tokenizer, alignment.drift_prompts(e.drift_prompts,
                                                                      seed=self.seed),
                drift.make_judge(e.drift_judge), max_new_tokens=e.drift_max_new_tokens,
                batch_size=e.batch_size, seed=self.seed)
        metrics, samples = self._drift(params)
        out = {k: float(metrics[k]) for k in drift.RATES}
        for name, c in metrics["categories"].items():
            key = "refusal_rate" if c["unsafe"] else "answer_rate"
            out[f"{key}/{name}"] = float(c[key])
        if self.workdir and jax.process_index() == 0:
            self._write_drift(drift, metrics, samples, step)
        return out

    def _write_drift(self, drift, metrics, samples, step: int) -> None:
        path = os.path.join(self.workdir, "drift.json")
        steps: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                steps = {k: v for k, v in json.load(f).get("steps", {}).items()
                         if int(k) < step}  # a resumed run evaluates later steps again
        steps[str(step)] = metrics
        first = steps[min(steps, key=int)]
        report = drift.compare_drift(first, metrics)
        drift.write_drift_report(path, report, before_step=int(min(steps, key=int)),
                                 after_step=step, steps=steps, samples=samples)
        log.info("drift, step %s vs step %d:\n%s", min(steps, key=int), step,
                 drift.drift_table(report))

    def _task(self, params) -> dict[str, float]:
        e = self.section
        if self._prompts is None:
            self._prompts = synthetic.addition_prompts(
                self.tokenizer, e.num_prompts, seed=self.seed, split="heldout",
                max_digits=synthetic.parse_spec(e.task))
        sampling = SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                                  eos_ids=(self.tokenizer.eos_id,), pad_id=self.tokenizer.pad_id)
        repeats = e.num_samples if e.temperature > 0 else 1
        # The same rng at every evaluation: differences between steps come from the params.
        return generation_accuracy(self.sampler, params, self.tokenizer,
                                   [p for p in self._prompts for _ in range(repeats)],
                                   synthetic.exact_match, sampling, batch_size=e.batch_size,
                                   rng=jax.random.key(self.seed))


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh sizes (-1: all remaining devices)."""

    data: int = 1  # data-parallel axis (params replicated)
    fsdp: int = -1  # fully sharded data-parallel axis
    tensor: int = 1  # tensor-parallel axis
    num_devices: int = 0  # use the first N devices only (0: all; single-host debugging)


def make_mesh(section: MeshSection) -> jax.sharding.Mesh:
    devices = jax.devices()[:section.num_devices] if section.num_devices else None
    return sh.make_mesh(sh.MeshConfig(section.data, section.fsdp, section.tensor), devices)


_NUMERICS = ("dtype", "param_dtype", "scan_layers", "remat_policy")


def model_config(section: ModelSection, vocab_size: int) -> ModelConfig:
    """The ModelConfig a section describes (HF folders: read from config.json)."""
    numerics = {k: getattr(section, k) for k in _NUMERICS}
    if section.hf_path:
        return hf_model_config(section.hf_path, **numerics)
    if section.preset:
        return preset(section.preset, **numerics)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    shape = {k: v for k, v in dataclasses.asdict(section).items() if k in fields}
    shape["vocab_size"] = section.vocab_size or vocab_size
    return ModelConfig(**shape)


def model_init(section: ModelSection, cfg: ModelConfig, mesh, seed: int,
               rules=sh.DEFAULT_RULES) -> tuple[Callable[[], Any], Any, Any]:
    """(init_params_fn, abstract_params, param_shardings) for the loop.

    The init function loads HF weights or another run's checkpoint straight onto the
    shardings, or initialises randomly inside a jit with sharded outputs.
    """
    shardings = sh.param_shardings(cfg, mesh, rules)
    abstract = param_shapes(cfg)

    def init():
        if section.hf_path:
            # The params' layout does not depend on the compute numerics (dtype, scan,
            # remat): `cfg` already carries them.
            _, params = from_hf(section.hf_path, cfg.param_dtype, mesh=mesh, rules=rules)
            return params
        if section.init_from:
            return params_of_run(section.init_from, section.init_step or None, abstract,
                                 shardings)
        return jax.jit(lambda: init_params(cfg, jax.random.key(seed)), out_shardings=shardings)()

    return init, abstract, shardings


def params_of_run(workdir: str, step: int | None, abstract, shardings):
    """Another run's params as the start of this one (a LoRA run's adapters merged)."""
    with open_run(workdir, step) as ckpt:
        return ckpt.restore_params(abstract, shardings)


def setup(model: ModelSection, mesh_section: MeshSection, tokenizer_spec: str,
          distributed: DistributedConfig = DistributedConfig()):
    """(tokenizer, mesh, model_cfg) of a recipe; EOS/BOS default to the tokenizer's.

    Joins the multi-host run `distributed` describes first (before any device is used);
    the mesh then spans every process's devices."""
    from jaxpost.tokenizer import load_tokenizer

    initialize(distributed)

    tokenizer = load_tokenizer(tokenizer_spec)
    mesh = make_mesh(mesh_section)
    model_cfg = model_config(model, tokenizer.vocab_size)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model vocab_size={model_cfg.vocab_size} is smaller than the "
                         f"tokenizer's ({tokenizer.vocab_size}, {tokenizer_spec!r})")
    if not model_cfg.eos_token_ids and tokenizer.eos_id is not None:
        model_cfg = model_cfg.replace(eos_token_ids=(tokenizer.eos_id,),
                                      bos_token_id=tokenizer.bos_id)
    return tokenizer, mesh, model_cfg


@dataclasses.dataclass(frozen=True)
class RecipeConfig(LoopConfig):
    """The keys every trainer's recipe shares (SFT, GRPO, reward model): declared once."""

    model: ModelSection = ModelSection()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshSection = MeshSection()
    distributed: DistributedConfig = DistributedConfig()  # multi-host: jax.distributed.initialize's settings (all empty: one process)
    freeze: tuple[str, ...] = ()  # regexes searched in HF tensor names (model.layers.3.mlp.down_proj.weight): matching tensors are frozen
    trainable: tuple[str, ...] = ()  # if non-empty, tensors matching none of these are frozen (with LoRA: base tensors that train besides the adapters)
    freeze_preset: str = ""  # "mid_mlp(a,b)" (layers a..b-1), "qk_only", "attention_only", "mlp_only", "hft(seed)" (Half Fine-Tuning); see jaxpost.peft.freeze
    lora: L.LoraConfig = L.LoraConfig()  # LoRA adapters (rank 0: off); the base is frozen except tensors `trainable` names
    allow_config_change: tuple[str, ...] = ()  # on resume: identity keys that may differ from the checkpoint's (dotted, as the error names them, e.g. "model.rope_theta"; a section such as "data" allows all its keys; "*": any)

    #: The recipe keys that say what a checkpoint *is*: where training started, which
    #: params train, which data and tokenizer. Resuming a workdir whose latest
    #: checkpoint stored other values stops with the keys named (see
    #: `check_resume_config`), unless `allow_config_change` lists them. The model's
    #: architecture is compared through its `ModelConfig` (every field but
    #: `RESUME_FREE_MODEL_FIELDS`). Every other key (optimizer, steps, logging,
    #: checkpointing, evaluation, batch and sequence sizes, GRPO knobs, rewards, mesh)
    #: may change freely. Keys a recipe does not have are skipped; trainers extend this.
    identity_keys: ClassVar[tuple[str, ...]] = (
        "trainer", "model.hf_path", "model.init_from", "model.init_step",
        "freeze", "trainable", "freeze_preset",
        "lora.rank", "lora.alpha", "lora.targets", "lora.rslora",
        "data.source", "data.split", "data.data_dir", "data.num_records", "data.tokenizer",
        "data.chat")

    def __post_init__(self):
        # LoopConfig's keys, checked here where every recipe passes: a zero would train
        # nothing and exit 0 (steps), or fail deep inside the loop (grad_accum_steps).
        _at_least(self, 1, "steps", "grad_accum_steps", "keep_checkpoints")
        _at_least(self, 0, "log_every", "checkpoint_every", "eval_every")


@dataclasses.dataclass
class ParamsPlan:
    """The params a recipe trains: how to make them, their shapes and shardings, which
    of them train, and the model config that applies them (LoRA scale included)."""

    model_cfg: ModelConfig
    init: Callable[[], Any]  # the starting params (adapters attached), on `shardings`
    abstract: Any  # jax.ShapeDtypeStruct of every param
    shardings: Any  # NamedSharding of every param
    mask: Mask  # jaxpost.peft.freeze mask: True / False / per-layer bools
    lora: L.LoraConfig

    @property
    def counts(self) -> partition.ParamCounts:
        return partition.count_params(self.abstract, self.mask)


def plan_params(cfg: RecipeConfig, model_cfg: ModelConfig, init: Callable[[], Any], abstract,
                shardings, logical_axes, mesh, *, rules=sh.DEFAULT_RULES,
                extra_rules: Rules = Rules()) -> ParamsPlan:
    """Applies the recipe's `freeze`, `trainable`, `freeze_preset` and `lora` keys to a
    base params description (a model's, or a reward model's with its head).

    Args:
      cfg: the recipe.
      model_cfg: the base model's config.
      init, abstract, shardings: the base params' init function, shapes and shardings.
      logical_axes: the base params' logical axis names (adapters shard like their base).
      mesh: the device mesh.
      rules: logical-axis rules.
      extra_rules: rules a trainer adds (the reward model keeps its head trainable).

    Raises:
      jaxpost.peft.freeze.FreezeRuleError / jaxpost.peft.lora.LoraError: a rule or
        target matches no tensor (both name it and a few real names).
    """
    user = make_rules(cfg.freeze, cfg.trainable, cfg.freeze_preset, model_cfg.num_layers)
    if not cfg.lora.enabled:
        mask = trainable_mask(abstract, user + extra_rules)
        return ParamsPlan(model_cfg, init, abstract, shardings, mask, cfg.lora)
    targets = L.lora_targets(abstract, cfg.lora)
    base_mask = trainable_mask(abstract, user + extra_rules, frozen_by_default=True)
    # AlignGuard's default split adds an alignment adapter (lora_*_align) per target.
    agl = getattr(cfg, "alignguard", None)
    suffixes = ("",) + ((ALIGN_SUFFIX,) if agl is not None and uses_align_adapter(agl) else ())
    rngs = [jax.random.fold_in(jax.random.key(cfg.seed), 2 + i) for i in range(len(suffixes))]

    def make_adapters():
        trees = [L.rename_adapters(L.init_adapters(abstract, cfg.lora, r), sfx)
                 for r, sfx in zip(rngs, suffixes)]
        out = trees[0]
        for t in trees[1:]:
            out = partition.combine(out, t)
        return out

    def merged(tree):
        out = L.rename_adapters(tree, "")
        for sfx in suffixes[1:]:
            out = partition.combine(out, L.rename_adapters(tree, sfx))
        return out

    adapter_shapes = jax.eval_shape(make_adapters)
    adapter_shardings = sh.logical_to_shardings(
        merged(L.adapter_logical_axes(logical_axes, targets)), adapter_shapes, mesh, rules)

    def init_with_adapters():
        adapters = jax.jit(make_adapters, out_shardings=adapter_shardings)()
        return L.attach_adapters(init(), adapters)

    return ParamsPlan(
        model_cfg=L.with_lora(model_cfg, cfg.lora), init=init_with_adapters,
        abstract=L.attach_adapters(abstract, adapter_shapes),
        shardings=partition.combine(shardings, adapter_shardings),
        mask=partition.combine(base_mask, merged(L.adapter_mask(targets))), lora=cfg.lora)


def reference_params(plan: ParamsPlan) -> Callable[[Any], Any]:
    """`fn(state) -> params of the run's starting policy` (GRPO's KL reference).

    Built from the run's start, never from the current or resumed state: the frozen
    params are shared with the state (no copy); trainable base tensors get one copy of
    their starting values, rebuilt with `plan.init` (deterministic: HF weights, the
    `init_from` checkpoint, or the seeded random init), so a resumed run keeps the same
    anchor. Under LoRA the adapters are left out (the base with the adapter off), so
    plain LoRA keeps no second copy of any weight.
    """
    stored: dict[str, Any] = {}

    def reference(state):
        base_trainable = L.strip_adapters(state.trainable)
        if not jax.tree.leaves(base_trainable):
            return state.frozen
        if "start" not in stored:
            start, _ = partition.split(plan.init(), plan.mask)
            stored["start"] = L.strip_adapters(start)
        return partition.combine(state.frozen, stored["start"])

    return reference


#: ModelConfig fields a resumed run may change freely: compute numerics and layout that
#: leave the params' meaning alone (`lora_scale` and `lora_dropout` follow the `lora.*`
#: keys, compared as such; `initializer_range` only matters before the first step).
RESUME_FREE_MODEL_FIELDS = ("dtype", "scan_layers", "remat_policy", "initializer_range",
                            "lora_scale", "lora_dropout")


class ConfigChangedError(ValueError):
    """A resumed workdir's checkpoint was written with other identity keys."""


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as stored in the metadata


def _lookup(tree: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def config_changes(metadata: dict, cfg: RecipeConfig,
                   model_cfg: ModelConfig) -> list[tuple[str, Any, Any]]:
    """`(key, stored, now)` for every identity key (`cfg.identity_keys`) and every
    compared `ModelConfig` field (as `model.FIELD`) whose value differs from the one in a
    checkpoint's `metadata`. Keys the metadata lacks (older checkpoints) are skipped."""
    stored_cfg, stored_model = (_json(metadata.get(k) or {}) for k in ("config", "model"))
    now_cfg, now_model = _json(dataclasses.asdict(cfg)), _json(dataclasses.asdict(model_cfg))
    changes = []
    no_lora = all(_lookup(c, "lora.rank")[1] in (0, None) for c in (stored_cfg, now_cfg))
    for key in type(cfg).identity_keys:
        if no_lora and key.startswith("lora."):
            continue  # targets of LoRA that is off in both runs do not matter
        (had, old), (has, new) = _lookup(stored_cfg, key), _lookup(now_cfg, key)
        if had and has and old != new:
            changes.append((key, old, new))
    for name, new in now_model.items():
        if name in RESUME_FREE_MODEL_FIELDS or name not in stored_model:
            continue
        if stored_model[name] != new:
            changes.append((f"model.{name}", stored_model[name], new))
    return changes


def _allowed(key: str, allow: tuple[str, ...]) -> bool:
    return any(a == "*" or key == a or key.startswith(a + ".") for a in allow)


def _short(value: Any) -> str:
    text = repr(tuple(value) if isinstance(value, list) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume_config(cfg: RecipeConfig, model_cfg: ModelConfig) -> None:
    """Before resuming `cfg.workdir`: compares the identity keys and the model config
    with the metadata of its latest checkpoint (nothing to do without one).

    Raises:
      ConfigChangedError: naming each differing key with its stored and new values,
        unless `cfg.allow_config_change` lists it (then it is logged as a warning).
    """
    step = latest_run_step(cfg.workdir)
    if step is None:
        return
    try:
        metadata = run_metadata(cfg.workdir, step)
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is the loop's to report
        log.warning("cannot read the metadata of step %d in %s to compare configs: %s",
                    step, cfg.workdir, e)
        return
    changes = config_changes(metadata, cfg, model_cfg)
    refused = [c for c in changes if not _allowed(c[0], cfg.allow_config_change)]
    for key, old, new in changes:
        if (key, old, new) not in refused:
            log.warning("resuming %s with %s=%s (its checkpoint has %s): allowed by "
                        "allow_config_change", cfg.workdir, key, _short(new), _short(old))
    if refused:
        listed = "; ".join(f"{k}: checkpoint {_short(o)}, now {_short(n)}" for k, o, n in refused)
        keys = tuple(k for k, _, _ in refused)
        raise ConfigChangedError(
            f"config.workdir={cfg.workdir} holds a checkpoint (step {step}) of another run: "
            f"{listed}. Resuming would train it as a different model or on other data; use "
            f"a new workdir, or if the change is deliberate pass "
            f"--config.allow_config_change=\"{keys!r}\"")


def load_recipe(spec: str, where: str = "recipe"):
    """The ConfigDict of a recipe spec: `"configs/x.py"` (its `get_config()`) or
    `"configs/x.py:ARG"` (`get_config("ARG")`, as `--config=file.py:ARG` passes it)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("jaxpost_recipe", path)
    if module_spec is None or module_spec.loader is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{where}={spec!r}: {path!r} is not a config file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*([arg] if arg else []))


def sft_warmup(cfg) -> tuple[ModelSection, Any]:
    """Trains a recipe's SFT warm-up (`init_sft_config`, `init_sft_steps`) into
    WORKDIR/sft_init and points the model section's `init_from` at it.

    Nothing to do (returns `(cfg.model, None)`) when the recipe names no warm-up or its
    model already starts elsewhere (`model.init_from`, `model.hf_path`). Otherwise
    returns `(model section, the warm-up's LoopResult)`: the warm-up resumes its own
    workdir like any run (a finished one is found done). A warm-up stopped by SIGTERM
    has saved its checkpoint (`result.preempted`); the caller must not train from it.
    """
    if cfg.model.init_from or cfg.model.hf_path or not cfg.init_sft_config:
        return cfg.model, None
    from jaxpost.config import to_dataclass
    from jaxpost.train import sft

    sft_dict = load_recipe(cfg.init_sft_config, "init_sft_config")
    sft_dict.workdir = os.path.join(cfg.workdir, "sft_init")
    if cfg.init_sft_steps:
        sft_dict.steps = cfg.init_sft_steps
    sft_cfg = to_dataclass(sft.SFTConfig, sft_dict, where="init_sft_config")
    log.info("training the SFT warm-up into %s", sft_cfg.workdir)
    result = sft.train(sft_cfg)
    return dataclasses.replace(sft_cfg.model, init_from=sft_cfg.workdir,
                               init_step=cfg.model.init_step), result


def run_recipe(cfg: RecipeConfig, task, plan: ParamsPlan, mesh, *,
               wrap_optimizer: Callable[[Any], Any] | None = None, **extra_metadata: Any):
    """Runs the shared loop with the recipe's `optimizer` section over `cfg.steps`, storing
    the config, the model config and the parameter split (plus `extra_metadata`) with
    every checkpoint. A workdir with a checkpoint resumes only if its identity keys match
    (`check_resume_config`). `wrap_optimizer(optimizer) -> optimizer` may extend the
    optax chain (GRPO's synced reference lives in its state)."""
    check_resume_config(cfg, plan.model_cfg)
    counts = plan.counts
    optimizer = make_optimizer(cfg.optimizer, cfg.steps)
    if wrap_optimizer is not None:
        optimizer = wrap_optimizer(optimizer)
    return run(cfg, task, init_params=plan.init, abstract_params=plan.abstract,
               param_shardings=plan.shardings, trainable_mask=plan.mask,
               optimizer=optimizer, mesh=mesh,
               schedule=make_schedule(cfg.optimizer, cfg.steps),
               metadata={"config": dataclasses.asdict(cfg),
                         "model": dataclasses.asdict(plan.model_cfg),
                         "params": {"trainable": counts.trainable, "frozen": counts.frozen},
                         **extra_metadata})
