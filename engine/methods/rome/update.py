"""The rank-one update (ROME eq. 2): Δ = δ (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*), so that Δ k* = δ.

Kept as factors u = δ and v = C⁻¹k* / (k*ᵀC⁻¹k*), so the layer computes W x + u (vᵀ x).
"""

from __future__ import annotations

import torch


def c_inverse_k(c: torch.Tensor | None, k_star: torch.Tensor, ridge: float) -> torch.Tensor:
    """C⁻¹k* by a linear solve (C + ridge·mean(diag C)·I keeps it well posed); C = I gives k*."""
    if c is None:
        return k_star.clone()
    c = c.to(device=k_star.device, dtype=torch.float64)
    c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return torch.linalg.solve(c, k_star.to(torch.float64)).float()


def update_direction(k_star: torch.Tensor, cinv_k: torch.Tensor) -> torch.Tensor:
    """C⁻¹k* / (k*ᵀC⁻¹k*): its dot product with a key is the share of δ the update adds there."""
    denom = torch.dot(k_star.float(), cinv_k.float())
    if not torch.isfinite(denom) or denom.abs() < 1e-12:
        raise FloatingPointError("k*ᵀ C⁻¹ k* is zero or not finite")
    return cinv_k.float() / denom


def rank_one(delta: torch.Tensor, direction: torch.Tensor,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u: (out, 1), v: (in, 1)) of Δ = δ directionᵀ, in the dtype the layer computes in."""
    return delta.float()[:, None].to(dtype), direction.float()[:, None].to(dtype)
