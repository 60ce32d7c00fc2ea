"""The rank-one update (ROME eq. 2): Δ = δ (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*), so that Δ k* = δ.

Kept as factors u = δ and v = C⁻¹k* / (k*ᵀC⁻¹k*), so the layer computes W x + u (vᵀ x).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


class FactorCache:
    """The Cholesky factor of the latest C (by identity) and ridge: factoring is O(d³) (minutes on
    a CPU for a 7B model's 18944-wide keys), each solve after it O(d²). One is kept at a time; the
    model handle owns it (``handle.caches``)."""

    def __init__(self) -> None:
        self.c: Any = None  # a weak reference to the C that was factored
        self.key: tuple[str, float] | None = None
        self.factor: torch.Tensor | None = None


def c_inverse_k(
    c: torch.Tensor | None, k_star: torch.Tensor, ridge: float, cache: FactorCache | None = None
) -> torch.Tensor:
    """C⁻¹k* (or C⁻¹X for a matrix of columns) with C + ridge·mean(diag C)·I, which keeps it well posed (C is a second moment, so
    that is symmetric positive definite: a Cholesky solve); C = I gives k*. With ``cache``, a C
    and ridge factored before are not factored again."""
    if c is None:
        return k_star.float().clone()
    cache = cache or FactorCache()
    key = (str(k_star.device), float(ridge))
    if cache.factor is None or cache.c() is not c or cache.key != key:
        a = c.to(device=k_star.device, dtype=torch.float64)
        a = a + ridge * a.diagonal().mean() * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info):
            raise FloatingPointError("the key statistics C are not positive definite; raise rome.ridge")
        cache.c, cache.key, cache.factor = weakref.ref(c), key, factor
    rhs = k_star.to(torch.float64)
    out = torch.cholesky_solve(rhs[:, None] if rhs.dim() == 1 else rhs, cache.factor)
    return (out[:, 0] if rhs.dim() == 1 else out).float()


def update_direction(k_star: torch.Tensor, cinv_k: torch.Tensor) -> torch.Tensor:
    """C⁻¹k* / (k*ᵀC⁻¹k*): its dot product with a key is the share of δ the update adds there."""
    denom = torch.dot(k_star.float(), cinv_k.float())
    if not torch.isfinite(denom) or denom.abs() < 1e-12:
        raise FloatingPointError("k*ᵀ C⁻¹ k* is zero or not finite")
    return cinv_k.float() / denom


def rank_one(delta: torch.Tensor, direction: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u: (out, 1), v: (in, 1)) of Δ = δ directionᵀ, in the dtype the layer computes in."""
    return delta.float()[:, None].to(dtype), direction.float()[:, None].to(dtype)


def spread_direction(
    c: torch.Tensor | None,
    keys: torch.Tensor,
    neighbours: torch.Tensor | None,
    weight: float,
    ridge: float,
    cache: FactorCache | None = None,
    shares: torch.Tensor | None = None,
) -> torch.Tensor:
    """The update's input direction d when an edit has several keys of its own and keys it
    should leave alone.

    ROME's d = C⁻¹k* / (k*ᵀC⁻¹k*) is the solution of: minimise dᵀCd (the update's expected
    effect on the keys C was measured on) subject to dᵀk* = 1. Here each row of ``keys`` must
    get its share of δ, dᵀK = s (``shares``; all 1 by default: the subject in other wordings
    gets the whole of δ, and a 0 is a key the update must not reach at all), and the keys of
    ``neighbours`` (other subjects in the prompt's place) join C with ``weight`` as if they
    were that share of its corpus: A = C + weight · NᵀN / n. The minimiser is

        d = A⁻¹K (KᵀA⁻¹K)⁻¹ s,

    which is ROME's own d for one key and no neighbours. A⁻¹ comes from C's cached
    Cholesky factor by the Woodbury identity, so no new factorisation is needed.
    """
    k = keys.float().T  # (d, m)
    ck = c_inverse_k(c, k, ridge, cache)  # C⁻¹K
    if neighbours is not None and len(neighbours) and weight > 0:
        n = neighbours.float().T  # (d, r)
        cn = c_inverse_k(c, n, ridge, cache)
        inner = (n.shape[1] / weight) * torch.eye(n.shape[1], device=n.device) + n.T @ cn
        ck = ck - cn @ torch.linalg.solve(inner.double(), (n.T @ ck).double()).float()
    gram = k.T @ ck  # KᵀA⁻¹K, (m, m)
    gram = gram + 1e-6 * gram.diagonal().mean() * torch.eye(gram.shape[0], device=gram.device)
    s = torch.ones(gram.shape[0]) if shares is None else shares
    d = ck @ torch.linalg.solve(gram.double(), s.to(device=gram.device, dtype=torch.float64)[:, None]).float()
    if not torch.isfinite(d).all():
        raise FloatingPointError("the update direction is not finite")
    return d[:, 0]


def shared_keys(
    c: torch.Tensor | None,
    keys: torch.Tensor,
    cache: FactorCache | None = None,
    threshold: float = 0.5,
    ridge: float = 0.0,
) -> list[tuple[int, int, float]]:
    """Pairs (i, j), i < j, of keys (rows) so alike that a least-squares update for either moves
    the other by more than ``threshold`` of its change, both ways: kᵢᵀC⁻¹kⱼ / kⱼᵀC⁻¹kⱼ, the
    smaller of the two with the pair. Such facts cannot hold different values."""
    k = keys.float().T  # (d, n)
    g = k.T @ c_inverse_k(c, k, ridge, cache)  # kᵢᵀC⁻¹kⱼ
    reach = g / g.diagonal().clamp_min(1e-12)[None, :]
    both = torch.minimum(reach, reach.T)
    pairs = torch.triu(both > threshold, diagonal=1).nonzero().tolist()
    return [(i, j, float(both[i, j])) for i, j in pairs]
