"""AlignGuard-LoRA (Das et al., arXiv 2508.02079; ALGORITHMS.md §1.2): a Fisher-guided
regulariser that keeps a LoRA fine-tune out of the directions its base model's alignment
depends on.

    L = L_task + λ_A · ΔW_Aᵀ F ΔW_A                      agl_fisher
               + λ_T · Σ h ⊙ ΔW_T²                        agl_stability
               + λ_NC · α · E_rm(ΔW_A, ΔW_T)              agl_overlap
               + λ_NC · (1 − α) · E_geo(ΔW_A, ΔW_T)       agl_geodesic

    E_rm  = mean_j η_j |a_j t_j|,  η_j = 1 + β·sigmoid(|a_j + t_j| − τ)   (Riemannian overlap)
    E_geo = ⟨a, t⟩² / (‖a‖²‖t‖² + ε)                                    (squared cosine)

per target matrix (each layer of a stacked kernel is one matrix), summed over matrices.
F is a cached Fisher of the base model on alignment data (`jaxpost.peft.fisher`):
diagonal (`Σ F ⊙ ΔW²`) or K-FAC (`‖Λ_in^½ U_inᵀ ΔW U_out Λ_out^½‖²`, the Fisher
restricted to its top eigen-directions). h is diag(F) (`stability="fisher"`; for K-FAC
`diag S_in ⊗ diag S_out`) or 1 (`"ones"`: plain L2).

**Which ΔW_A, ΔW_T** (`split`). One orthogonal split of one ΔW makes the collision terms
identically zero (⟨P δ, (I−P) δ⟩ = 0; with a coordinate mask a_j t_j = 0 too), so the
default `split="adapters"` trains two LoRA adapters per target: the task adapter
(`lora_a`/`lora_b`) gives ΔW_T and the alignment adapter (`lora_a_align`/`lora_b_align`,
`ALIGN_SUFFIX`) gives ΔW_A; the model applies their sum (ΔW = ΔW_A + ΔW_T; merge and PEFT
export write the sum). Both parts are free, so both collision terms are informative.
`split="projection"` is the paper's single-adapter form, ΔW_A = P_A(ΔW): the K-FAC
eigenspace projector `U_in U_inᵀ ΔW U_out U_outᵀ` (E_geo ≡ 0) or, for a diagonal Fisher,
the mask of the `top_frac` largest Fisher coordinates (E_rm ≡ E_geo ≡ 0);
`config_warnings` names the terms a configuration zeroes.

API (stable; `jaxpost/train/regularise.py` wires it into recipes):
- `AlignGuardConfig`: the recipe section `alignguard`.
- `alignguard_terms(delta_a, delta_t, stats, cfg) -> dict` unweighted `fisher`,
  `stability`, `overlap`, `geodesic` (float32 scalars), from per-matrix dicts keyed by
  kernel path (`"layers/self_attn/q_proj/kernel"`).
- `alignguard_penalty(...) -> (value, metrics)`: weighted, metrics `agl_*`.
- `fisher_stats(fisher, cfg) -> dict`: the arrays the penalty reads, from a `Fisher`.
- `alignguard_regulariser(cfg, stats, lora_scale) -> Regulariser` for the train step.
- `config_warnings(cfg, fisher_kind) -> list[str]`; `uses_align_adapter(cfg)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxpost.peft import lora as L
from jaxpost.peft.fisher import DIAGONAL, KFAC, Fisher
from jaxpost.peft.partition import combine
from jaxpost.peft.regularisers import Regulariser, adapter_deltas

__all__ = [
    "ALIGN_SUFFIX",
    "METRICS",
    "AlignGuardConfig",
    "alignguard_penalty",
    "alignguard_regulariser",
    "alignguard_terms",
    "config_warnings",
    "fisher_stats",
    "flat_kernels",
    "project",
    "uses_align_adapter",
]

ALIGN_SUFFIX = "_align"  # the alignment adapter's leaves: lora_a_align / lora_b_align
SPLITS = ("adapters", "projection")
STABILITY = ("fisher", "ones")
#: term -> metric name (the public contract)
METRICS = {"fisher": "agl_fisher", "stability": "agl_stability", "overlap": "agl_overlap",
           "geodesic": "agl_geodesic"}


@dataclasses.dataclass(frozen=True)
class AlignGuardConfig:
    """The recipe section `alignguard` (ALGORITHMS.md §1.2; defaults from the Sirhan1
    reimplementation, not the paper, whose hyperparameter tables were not readable)."""

    enabled: bool = False  # apply AlignGuard (needs lora.rank > 0 and a Fisher, see the `fisher` section)
    lambda_a: float = 0.25  # λ_A: weight of the Fisher penalty ΔW_Aᵀ F ΔW_A on the alignment part (logged as agl_fisher)
    lambda_t: float = 0.5  # λ_T: weight of the stability penalty Σ h·ΔW_T² on the task part (agl_stability)
    lambda_nc: float = 0.1  # λ_NC: weight of the collision penalty α·E_rm + (1−α)·E_geo (agl_overlap, agl_geodesic); all λ = 0: plain LoRA
    alpha: float = 0.5  # α: share of the Riemannian overlap E_rm in the collision penalty (1−α: geodesic E_geo)
    beta: float = 4.0  # β: overlap weight growth, η_j = 1 + β·sigmoid(|a_j + t_j| − τ)
    tau: float = 0.01  # τ: overlap threshold in η_j
    eps: float = 1e-12  # ε in E_geo = ⟨a,t⟩² / (‖a‖²‖t‖² + ε) (0/0 at ΔW = 0)
    split: str = "adapters"  # "adapters": two LoRA adapters per target (alignment: lora_*_align, task: lora_*), collision terms informative; "projection": ΔW_A = P_A(ΔW) of one adapter (E_geo ≡ 0; with a diagonal Fisher E_rm ≡ 0 too)
    stability: str = "fisher"  # h of the stability term: "fisher" (diagonal of F) or "ones" (plain L2)
    top_frac: float = 0.1  # split="projection" with a diagonal Fisher: P_A keeps this fraction of each matrix's coordinates (largest F)

    def __post_init__(self):
        for name in ("lambda_a", "lambda_t", "lambda_nc", "beta", "eps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"alignguard.{name}={v!r}: expected a finite number >= 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alignguard.alpha={self.alpha!r}: expected a share in [0, 1]")
        if self.split not in SPLITS:
            raise ValueError(f"alignguard.split={self.split!r}; expected one of {SPLITS}")
        if self.stability not in STABILITY:
            raise ValueError(f"alignguard.stability={self.stability!r}; expected one of "
                             f"{STABILITY}")
        if not 0.0 < self.top_frac <= 1.0:
            raise ValueError(f"alignguard.top_frac={self.top_frac!r}: expected (0, 1]")

    @property
    def active(self) -> bool:
        """Enabled with some λ > 0 (else the run is plain LoRA)."""
        return self.enabled and (self.lambda_a > 0 or self.lambda_t > 0 or self.lambda_nc > 0)


def uses_align_adapter(cfg: AlignGuardConfig) -> bool:
    """Whether the run trains the second (alignment) adapter per target."""
    return cfg.active and cfg.split == "adapters"


def config_warnings(cfg: AlignGuardConfig, fisher_kind: str) -> list[str]:
    """What a configuration makes identically zero or pointless (one sentence each)."""
    if not cfg.enabled:
        return []
    out = []
    if not cfg.active:
        out.append("alignguard.enabled with lambda_a = lambda_t = lambda_nc = 0: this is "
                   "plain LoRA (no alignment adapter, no penalty)")
    if cfg.split == "projection" and cfg.lambda_nc > 0:
        if fisher_kind == DIAGONAL and cfg.alpha > 0:
            out.append("alignguard.split='projection' with a diagonal Fisher splits ΔW by a "
                       "coordinate mask, so agl_overlap (E_rm) is identically 0")
        if cfg.alpha < 1:
            out.append(f"alignguard.split='projection' is an orthogonal split of one ΔW "
                       f"({'coordinate mask' if fisher_kind == DIAGONAL else 'K-FAC eigenspace projector'}),"
                       " so agl_geodesic (E_geo) is identically 0; use split='adapters' to "
                       "make the collision terms informative")
    return out


# ----------------------------------------------------------------------------- stats
def _flat(tree: Mapping, stop=lambda node: False, where=()) -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        here = where + (k,)
        if isinstance(v, Mapping) and not stop(v):
            out.update(_flat(v, stop, here))
        else:
            out["/".join(here)] = v
    return out


def flat_kernels(deltas: Mapping) -> dict[str, jax.Array]:
    """`{"layers/self_attn/q_proj/kernel": ΔW}` of a nested delta tree."""
    return _flat(deltas)


def _top_mask(f: jax.Array, frac: float) -> jax.Array:
    """1 on the `ceil(frac·n)` largest entries of each [in, out] matrix of f, else 0."""
    d_in, d_out = f.shape[-2:]
    flat = f.reshape((-1, d_in * d_out))
    k = max(1, math.ceil(frac * d_in * d_out))
    idx = jnp.argsort(-flat, axis=-1)[:, :k]
    mask = jax.vmap(lambda i: jnp.zeros((d_in * d_out,), jnp.float32).at[i].set(1.0))(idx)
    return mask.reshape(f.shape)


def fisher_stats(fisher: Fisher, cfg: AlignGuardConfig) -> dict:
    """The per-matrix arrays `alignguard_terms` reads, keyed by kernel path.

    Diagonal: `f` (F), `h` (F or ones) and, for `split="projection"`, `mask`. K-FAC:
    `u_in`, `lam_in`, `u_out`, `lam_out` and `h` (`diag S_in ⊗ diag S_out`, or ones).
    """
    out = {}
    if fisher.kind == DIAGONAL:
        for key, f in _flat(fisher.tree).items():
            f = jnp.asarray(f, jnp.float32)
            s = {"f": f, "h": f if cfg.stability == "fisher" else jnp.ones_like(f)}
            if cfg.split == "projection":
                s["mask"] = _top_mask(f, cfg.top_frac)
            out[key] = s
    elif fisher.kind == KFAC:
        for key, node in _flat(fisher.tree, stop=lambda n: "s_in" in n).items():
            d_in = jnp.diagonal(node["s_in"], axis1=-2, axis2=-1)
            d_out = jnp.diagonal(node["s_out"], axis1=-2, axis2=-1)
            h = d_in[..., :, None] * d_out[..., None, :]
            out[key] = {k: jnp.asarray(node[k], jnp.float32)
                        for k in ("u_in", "lam_in", "u_out", "lam_out")}
            out[key]["h"] = h if cfg.stability == "fisher" else jnp.ones_like(h)
    else:
        raise ValueError(f"fisher_stats: unknown Fisher kind {fisher.kind!r}")
    return out


# ----------------------------------------------------------------------------- terms
def _hi(x, y, spec):
    return jnp.einsum(spec, x, y, precision=jax.lax.Precision.HIGHEST)


def _quad_fisher(delta: jax.Array, s: Mapping) -> jax.Array:
    """ΔWᵀ F ΔW of each matrix (summed over a leading layers axis)."""
    if "f" in s:
        return jnp.sum(s["f"] * jnp.square(delta))
    core = _hi(_hi(s["u_in"], delta, "...ik,...io->...ko"), s["u_out"], "...ko,...oj->...kj")
    weight = jnp.maximum(s["lam_in"], 0)[..., :, None] * jnp.maximum(s["lam_out"], 0)[..., None, :]
    return jnp.sum(weight * jnp.square(core))


def project(delta: jax.Array, s: Mapping) -> jax.Array:
    """P_A(ΔW): the diagonal mask, or `U_in U_inᵀ ΔW U_out U_outᵀ` (kernel layout)."""
    if "mask" in s:
        return s["mask"] * delta
    if "u_in" in s:
        p_in = _hi(s["u_in"], s["u_in"], "...ik,...jk->...ij")
        p_out = _hi(s["u_out"], s["u_out"], "...ok,...pk->...op")
        return _hi(_hi(p_in, delta, "...ij,...jo->...io"), p_out, "...io,...op->...ip")
    raise ValueError("split='projection' needs a K-FAC Fisher or a diagonal one with a mask "
                     "(fisher_stats with split='projection')")


def alignguard_terms(delta_a: Mapping[str, jax.Array], delta_t: Mapping[str, jax.Array],
                     stats: Mapping[str, Mapping], cfg: AlignGuardConfig) -> dict[str, jax.Array]:
    """Unweighted `fisher`, `stability`, `overlap` (E_rm), `geodesic` (E_geo), summed over
    matrices; ΔW_A / ΔW_T / stats keyed alike (kernel paths; a kernel absent from a
    delta dict has a zero part). Float32."""
    zero = jnp.zeros((), jnp.float32)
    out = {k: zero for k in METRICS}
    for key, s in stats.items():
        a = delta_a.get(key)
        t = delta_t.get(key)
        if a is None and t is None:
            raise ValueError(f"alignguard: the Fisher has {key} but no adapter updates it "
                             "(compute the Fisher for the LoRA targets)")
        a = jnp.zeros_like(t) if a is None else a.astype(jnp.float32)
        t = jnp.zeros_like(a) if t is None else t.astype(jnp.float32)
        out["fisher"] += _quad_fisher(a, s)
        out["stability"] += jnp.sum(s["h"] * jnp.square(t))
        eta = 1.0 + cfg.beta * jax.nn.sigmoid(jnp.abs(a + t) - cfg.tau)
        out["overlap"] += jnp.sum(jnp.mean(eta * jnp.abs(a * t), axis=(-2, -1)))
        dot = jnp.sum(a * t, axis=(-2, -1))
        norms = jnp.sum(a * a, axis=(-2, -1)) * jnp.sum(t * t, axis=(-2, -1))
        out["geodesic"] += jnp.sum(jnp.square(dot) / (norms + cfg.eps))
    return out


def alignguard_penalty(delta_a, delta_t, stats, cfg: AlignGuardConfig):
    """`(value, {agl_fisher, agl_stability, agl_overlap, agl_geodesic})`, each metric its
    weighted contribution to the loss."""
    terms = alignguard_terms(delta_a, delta_t, stats, cfg)
    weights = {"fisher": cfg.lambda_a, "stability": cfg.lambda_t,
               "overlap": cfg.lambda_nc * cfg.alpha, "geodesic": cfg.lambda_nc * (1 - cfg.alpha)}
    metrics = {METRICS[k]: weights[k] * v for k, v in terms.items()}
    return sum(metrics.values()), metrics


def split_deltas(params: Mapping, stats: Mapping, cfg: AlignGuardConfig, lora_scale: float):
    """(ΔW_A, ΔW_T) per kernel path from params holding the adapters."""
    if cfg.split == "adapters":
        return (flat_kernels(adapter_deltas(params, lora_scale, (ALIGN_SUFFIX,))),
                flat_kernels(adapter_deltas(params, lora_scale, ("",))))
    delta = flat_kernels(adapter_deltas(params, lora_scale, L.adapter_suffixes(params)))
    delta_a = {k: project(d, stats[k]) for k, d in delta.items() if k in stats}
    return delta_a, {k: d - delta_a[k] if k in delta_a else d for k, d in delta.items()}


def alignguard_regulariser(cfg: AlignGuardConfig, stats: Mapping, lora_scale: float,
                           name: str = "alignguard") -> Regulariser:
    """The AlignGuard penalty as a train-step `Regulariser` (stats: `fisher_stats`)."""
    if not lora_scale:
        raise ValueError("alignguard needs LoRA (lora.rank > 0): its parts are adapter updates")

    def fn(trainable, frozen, stats):
        delta_a, delta_t = split_deltas(combine(frozen, trainable), stats, cfg, lora_scale)
        return alignguard_penalty(delta_a, delta_t, stats, cfg)
    return Regulariser(name, fn, dict(stats))
