"""Intruder dimensions (Shuttleworth et al., arXiv 2410.21228; ALGORITHMS.md §5.1).

A singular vector y_j of the fine-tuned (merged) matrix W = W₀ + ΔW is an intruder
dimension if `max_i |cos(y_j, x_i)| < ε`, the x_i ranging over the singular vectors of
W₀ (the min(m, n) of a thin SVD, sign-invariant). The top `k` singular vectors of W (by
singular value) are examined; the count is reported per ε, with the intruders' "energy
share" `Σ_intruders σ_j² / Σ_top-k σ_j²`. Matrices are in Hugging Face orientation
`[out, in]`, so `side="left"` compares output-space directions (the paper's default).

Degenerate singular values make individual vectors non-unique (the count can then move
without the subspace moving), and a random unit vector in d dimensions has max|cos| of
order sqrt(2 ln d / d), so at small d a fixed ε is a weaker test than at d = 4096.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SIDES = ("left", "right")


def _oriented(w: jax.Array, side: str) -> jax.Array:
    if side not in SIDES:
        raise ValueError(f"side={side!r}; expected one of {SIDES}")
    w = jnp.asarray(w, jnp.float32)
    return w if side == "left" else w.T


@functools.partial(jax.jit, static_argnames=("side",))
def singular_basis(w0: jax.Array, side: str = "left") -> jax.Array:
    """The base's singular vectors as columns ([m, min(m, n)]; left: of `w0`, right: of
    `w0.T`), float32. Compute once per base matrix and reuse for every checkpoint."""
    return jnp.linalg.svd(_oriented(w0, side), full_matrices=False)[0]


@functools.partial(jax.jit, static_argnames=("k", "side"))
def max_cosines_to_basis(basis: jax.Array, w: jax.Array, k: int = 10, side: str = "left"
                         ) -> tuple[jax.Array, jax.Array]:
    """(max_cos [k'], sigma [k']) of the top k' = min(k, rank) singular vectors of `w`
    against the columns of `basis` (`singular_basis` of the base matrix)."""
    u, s, _ = jnp.linalg.svd(_oriented(w, side), full_matrices=False)
    k = min(k, s.shape[0])
    cos = jnp.abs(jnp.matmul(u[:, :k].T, basis, precision=jax.lax.Precision.HIGHEST))
    return jnp.max(cos, axis=1), s[:k]


def max_cosines(w0: jax.Array, w: jax.Array, k: int = 10, side: str = "left"
                ) -> tuple[jax.Array, jax.Array]:
    """(max_cos [k'], sigma [k']) of the top k' = min(k, rank) singular vectors of `w`.

    `max_cos[j] = max_i |<y_j, x_i>|` over every singular vector x_i of `w0` (unit
    vectors, so this is the absolute cosine); `sigma[j]` is y_j's singular value. Float32.
    """
    return max_cosines_to_basis(singular_basis(w0, side), w, k=k, side=side)


@dataclasses.dataclass(frozen=True)
class IntruderResult:
    """Intruder dimensions of one matrix at each ε."""

    max_cos: np.ndarray  # [k] best |cos| of each top singular vector to the base's
    sigma: np.ndarray  # [k] their singular values
    epsilons: tuple[float, ...]
    counts: tuple[int, ...]  # intruders at each ε
    energy_share: tuple[float, ...]  # Σ_intruders σ² / Σ_top-k σ², at each ε


def intruder_dimensions(w0, w, k: int = 10, epsilons: Sequence[float] = (0.5,),
                        side: str = "left", basis=None) -> IntruderResult:
    """Counts the intruder dimensions of `w` against `w0` (2-D, same shape) at each ε.

    Args:
      w0, w: the base and the fine-tuned (merged) matrix, HF orientation `[out, in]`.
      k: how many top singular vectors of `w` to examine (the paper: 10).
      epsilons: thresholds on the best |cos|.
      side: "left" (output space) or "right" singular vectors.
      basis: `singular_basis(w0, side)` if already computed (skips the base's SVD).

    Raises:
      ValueError: the matrices are not 2-D of one shape, or `k` < 1.
    """
    if np.ndim(w0) != 2 or np.shape(w0) != np.shape(w):
        raise ValueError(f"intruder_dimensions needs two 2-D matrices of one shape, got "
                         f"{np.shape(w0)} and {np.shape(w)}")
    if k < 1:
        raise ValueError(f"k={k}: examine at least one singular vector")
    if basis is None:
        basis = singular_basis(w0, side)
    cos, sigma = (np.asarray(x, np.float64)
                  for x in max_cosines_to_basis(basis, w, k=k, side=side))
    energy = sigma ** 2
    total = float(energy.sum())
    counts, shares = [], []
    for eps in epsilons:
        hit = cos < eps
        counts.append(int(hit.sum()))
        shares.append(float(energy[hit].sum() / total) if total > 0 else 0.0)
    return IntruderResult(cos, sigma, tuple(float(e) for e in epsilons), tuple(counts),
                          tuple(shares))


__all__ = [
    "SIDES",
    "IntruderResult",
    "intruder_dimensions",
    "max_cosines",
    "max_cosines_to_basis",
    "singular_basis",
]
