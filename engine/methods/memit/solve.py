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

In sequential editing that term, as MEMIT writes it, prices only the new batch's change: each
batch moves ordinary keys a little more, in directions the next batch does not see. Counted from
the unedited weights instead (``AlphaEditSolve.extra``), it also takes back what earlier batches
moved there, as far as their own keys (in Kₚ) allow. And keeping earlier keys "as they are now"
lets each batch's compromise at them add up; fitting them to their own batch's targets
(``AlphaEditSolve.extra``'s lack) solves for all the facts so far instead.
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


class AlphaEditSolve:
    """One layer's AlphaEdit solve for a batch: M⁻¹ x in Q's coordinates, M = Qᵀ J Jᵀ Q + D,
    J = [K, Kₚ] (the batch's keys and earlier batches' keys, as rows (n, d_in) and (p, d_in)),
    D diagonal (μ, plus λ·eᵢ with the preservation term ``weight`` λ), by Woodbury:
    M⁻¹ = D⁻¹ - D⁻¹ QᵀJ (I + JᵀQ D⁻¹ QᵀJ)⁻¹ JᵀQ D⁻¹. Built once, it gives the batch's V
    (``factors``) and, when asked, its change beyond its own facts (``extra``)."""

    def __init__(
        self, space: NullSpace, keys: torch.Tensor, earlier: torch.Tensor | None, mu: float, weight: float = 0.0
    ) -> None:
        self.space, self.weight = space, weight
        self.k = keys.double().T  # (d, n)
        j = (
            self.k
            if earlier is None or not len(earlier)
            else torch.cat([self.k, earlier.double().T.to(self.k.device)], 1)
        )
        self.q = space.q.to(j.device, torch.float64)
        self.qj = self.q.T @ j  # (m, n + p)
        d = torch.full((self.q.shape[1],), mu, dtype=torch.float64, device=j.device)
        if weight > 0:
            d = d + weight * space.values.to(j.device, torch.float64)
        self.d = d
        eye = torch.eye(self.qj.shape[1], dtype=torch.float64, device=j.device)
        self.inner = eye + self.qj.T @ (self.qj / d[:, None])

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """M⁻¹ x for x (m, r)."""
        dx = x / self.d[:, None]
        return dx - (self.qj / self.d[:, None]) @ torch.linalg.solve(self.inner, self.qj.T @ dx)

    def factors(self) -> torch.Tensor:
        """V (d_in, n): Q M⁻¹ Qᵀ K.

        ``weight`` λ > 0 adds MEMIT's preservation term λ tr(Δ'P C PΔ'ᵀ) to the objective, for
        what of ordinary keys P leaves in (a null space of directions barely used, not unused):
        in Q's coordinates QᵀCQ is C's small eigenvalues, so μI becomes D = μ + λ·eᵢ."""
        v = self.q @ self.solve(self.q.T @ self.k)
        if not torch.isfinite(v).all():
            raise FloatingPointError("AlphaEdit's solve is not finite")
        return v.float()

    def extra(
        self,
        before: tuple[torch.Tensor, torch.Tensor] | None = None,
        lack: torch.Tensor | None = None,
        tol: float = 1e-4,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The part of the batch's change beyond fitting its own facts and keeping the earlier
        batches' keys as they are now: factors (d_out, r) and (d_in, r) to add to the batch's own,
        or None when neither term is asked for.

        Both terms add to the right-hand side of the normal equations of A = Δ'Q, A M = R KᵀQ + B:

        - ``before`` = (U, V), the earlier batches' change Δₚ = Σ U Vᵀ: the preservation term
          counted from the unedited weights, λ tr((Δₚ + Δ) C (Δₚ + Δ)ᵀ), rather than from the
          weights as they are, adds B = -λ Δₚ C Q = -λ Δₚ Q E (C Q = Q E: Q are C's
          eigenvectors, E their eigenvalues). The batch takes back, on ordinary keys, what the
          earlier ones moved there; without it each batch's change on ordinary keys adds to the
          last's.
        - ``lack`` (d_out, p): what each earlier key still lacks of the change its own batch set
          out to give it (its target share, less what the edits since have given it). The earlier
          keys are then fitted to their targets, ‖Δ'P Kₚ - lack‖², rather than kept as they are
          now, so B = lack KₚᵀQ, and each batch solves the objective of all the facts so far: a
          batch's compromise at earlier keys is not kept and compounded by the next (with
          ``before``, keeping "as now" shrinks the earlier facts again at every batch).

        The extra change is X Qᵀ with X = B M⁻¹ (d_out, m), factored by its SVD, X = A S Wᵀ, less
        the components below ``tol`` of the largest (its rank is at most d_out and the earlier
        facts' count): A S (d_out, r) and Q W (d_in, r)."""
        if before is None and lack is None:
            return None
        terms = []  # B's terms, each (d_out, m)
        if before is not None:
            u_p, v_p = before[0].double().to(self.q.device), before[1].double().to(self.q.device)
            e = self.space.values.to(self.q.device, torch.float64)
            terms.append(-self.weight * (u_p @ (v_p.T @ self.q)) * e[None, :])  # -λ Δₚ Q E
        if lack is not None:
            earlier = self.qj[:, self.k.shape[1] :]  # Qᵀ Kₚ, (m, p)
            if earlier.shape[1] != lack.shape[1]:
                raise ValueError(f"{lack.shape[1]} targets for {earlier.shape[1]} earlier keys")
            terms.append(lack.double().to(self.q.device) @ earlier.T)  # lack KₚᵀQ
        b = sum(terms[1:], terms[0])
        x = self.solve(b.T).T  # B M⁻¹ (M is symmetric)
        a, s, wt = torch.linalg.svd(x, full_matrices=False)
        keep = s > tol * float(s.max()) if len(s) and float(s.max()) > 0 else torch.zeros_like(s, dtype=torch.bool)
        u2 = a[:, keep] * s[keep][None, :]
        v2 = self.q @ wt[keep].T
        if not (torch.isfinite(u2).all() and torch.isfinite(v2).all()):
            raise FloatingPointError("AlphaEdit's extra change is not finite")
        return u2.float(), v2.float()


def alphaedit_factors(
    space: NullSpace, keys: torch.Tensor, earlier: torch.Tensor | None, mu: float, weight: float = 0.0
) -> torch.Tensor:
    """V for AlphaEdit (AlphaEditSolve.factors), keys as rows (n, d_in) and earlier batches' keys
    as rows (p, d_in); returns (d_in, n)."""
    return AlphaEditSolve(space, keys, earlier, mu, weight).factors()
