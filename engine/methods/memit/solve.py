"""One layer's change, as factors: Δ = U Vᵀ with U = R (d_out, n) and V (d_in, n).

MEMIT: Δ minimises ‖Δ K - R‖² + λ tr(Δ C Δᵀ), so Δ (λC + K Kᵀ) = R Kᵀ and
    V = (λC + K Kᵀ)⁻¹ K = (λC)⁻¹ K (I + Kᵀ (λC)⁻¹ K)⁻¹        (Woodbury),
which needs only C's Cholesky factor (cached, as ROME's is) and an n × n solve.

AlphaEdit: Δ = Δ' P, where P = Q Qᵀ projects onto the null space of C (Q: C's eigenvectors with
small eigenvalues), minimising ‖Δ' P K - R‖² + ‖Δ' P Kₚ‖² + μ ‖Δ' P‖². Its normal equations give
V = P V with (P G P + μI) V = P K, G = K Kᵀ + Kₚ Kₚᵀ (the paper's closed form, written in Q's
coordinates so that it stays symmetric): V = Q y,
    y = (Qᵀ G Q + μI)⁻¹ Qᵀ K = (1/μ) (Qᵀ K - Qᵀ J (μI + Jᵀ Q Qᵀ J)⁻¹ Jᵀ Q Qᵀ K),
J = [K, Kₚ]: again a Woodbury solve, of size n + (earlier keys). Δ k = U Vᵀ k = U yᵀ Qᵀ k, which
is zero for every key in C's span that P removes: what the model knew is left alone.

Where C has no truly unused directions (a small model's keys use every one a little), P at a
relative threshold keeps part of ordinary keys' energy, and the paper's objective no longer
protects it. ``weight`` λ then adds MEMIT's own term λ tr(Δ'P C PΔ'ᵀ), which prices each of P's
directions by how much ordinary text uses it; QᵀCQ is diagonal (Q are C's eigenvectors), so μI
becomes D = μI + λ diag(eᵢ) and the solve stays a Woodbury one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kedit.engine.methods.rome.update import FactorCache, c_inverse_k


def memit_factors(
    c: torch.Tensor | None, keys: torch.Tensor, weight: float, cache: FactorCache | None = None
) -> torch.Tensor:
    """V for MEMIT: (λC + K Kᵀ)⁻¹ K, keys as rows (n, d_in); returns (d_in, n). C None: C = I."""
    k = keys.double().T  # (d, n)
    ck = c_inverse_k(c, k.float(), 0.0, cache).double() / weight  # (λC)⁻¹K
    inner = torch.eye(k.shape[1], dtype=torch.float64, device=k.device) + k.T @ ck
    v = ck @ torch.linalg.solve(inner, torch.eye(k.shape[1], dtype=torch.float64, device=k.device))
    if not torch.isfinite(v).all():
        raise FloatingPointError("MEMIT's solve is not finite")
    return v.float()


def shared_keys(
    c: torch.Tensor | None, keys: torch.Tensor, cache: FactorCache | None = None, threshold: float = 0.5
) -> list[tuple[int, int, float]]:
    """Pairs (i, j), i < j, of keys (rows) so alike that a least-squares update for either moves
    the other by more than ``threshold`` of its change, both ways: kᵢᵀC⁻¹kⱼ / kⱼᵀC⁻¹kⱼ, the
    smaller of the two with the pair. Such facts cannot hold different values."""
    k = keys.float().T  # (d, n)
    g = k.T @ c_inverse_k(c, k, 0.0, cache)  # kᵢᵀC⁻¹kⱼ
    reach = g / g.diagonal().clamp_min(1e-12)[None, :]
    both = torch.minimum(reach, reach.T)
    pairs = torch.triu(both > threshold, diagonal=1).nonzero().tolist()
    return [(i, j, float(both[i, j])) for i, j in pairs]


@dataclass
class NullSpace:
    """Q (d, m): an orthonormal basis of the directions C's keys barely use; P = Q Qᵀ."""

    q: torch.Tensor
    kept: int  # m
    width: int  # d
    threshold: float  # the eigenvalue cut, in C's own units
    values: torch.Tensor  # (m,): C's eigenvalues along Q's columns (QᵀCQ is diagonal)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """P x for columns x (d, n)."""
        q = self.q.to(x.device, x.dtype)
        return q @ (q.T @ x)


def null_space(raw_c: torch.Tensor, threshold: float) -> NullSpace:
    """C's eigenvectors whose eigenvalues are below ``threshold`` times their mean."""
    c = raw_c.double()
    values, vectors = torch.linalg.eigh((c + c.T) / 2)
    cut = threshold * float(values.mean())
    small = values < cut
    return NullSpace(vectors[:, small].float().contiguous(), int(small.sum()), c.shape[0], cut, values[small].float())


def alphaedit_factors(
    space: NullSpace, keys: torch.Tensor, earlier: torch.Tensor | None, mu: float, weight: float = 0.0
) -> torch.Tensor:
    """V for AlphaEdit, keys as rows (n, d_in) and earlier batches' keys as rows (p, d_in); returns (d_in, n).

    ``weight`` λ > 0 adds MEMIT's preservation term λ tr(Δ'P C PΔ'ᵀ) to the objective, for what
    of ordinary keys P leaves in (a null space of directions barely used, not unused): in Q's
    coordinates QᵀCQ is C's small eigenvalues, so μI becomes the diagonal D = μ + λ·eᵢ."""
    q = space.q.to(keys.device, torch.float64)
    k = keys.double().T  # (d, n)
    j = k if earlier is None or not len(earlier) else torch.cat([k, earlier.double().T.to(k.device)], dim=1)
    qk, qj = q.T @ k, q.T @ j  # (m, n), (m, n + p)
    d = torch.full((q.shape[1],), mu, dtype=torch.float64, device=k.device)
    if weight > 0:
        d = d + weight * space.values.to(k.device, torch.float64)
    dqj, dqk = qj / d[:, None], qk / d[:, None]
    inner = torch.eye(qj.shape[1], dtype=torch.float64, device=k.device) + qj.T @ dqj
    y = dqk - dqj @ torch.linalg.solve(inner, qj.T @ dqk)
    v = q @ y
    if not torch.isfinite(v).all():
        raise FloatingPointError("AlphaEdit's solve is not finite")
    return v.float()
