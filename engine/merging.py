"""Merging of parameter or activation deltas, shared by WISE's side memories and steering vectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch


def ties_merge(
    taus: Sequence[torch.Tensor], density: float, live: Sequence[torch.Tensor | None] | None = None
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023) of task vectors: trim, elect sign, disjoint mean.

    The choices (which entries survive the trim, the elected sign, who agrees with it)
    are made without gradient; the mean itself is differentiable in the task vectors, so
    an edit can be trained through the merge it will be part of. ``live[j]`` marks entries
    where task vector j takes part even while zero (the entries an edit is training),
    instead of only its nonzero ones.
    """
    live = list(live) if live is not None else [None] * len(taus)
    with torch.no_grad():
        present = []
        for tau, lv in zip(taus, live):
            p = (tau != 0) if lv is None else (lv | (tau != 0))
            if density < 1.0 and bool((tau != 0).any()):
                nz = tau[tau != 0].abs()
                k = max(1, int(round((1 - density) * nz.numel())))
                cut = nz.kthvalue(k).values if k < nz.numel() else nz.max()
                p = p & ((tau.abs() >= cut) | (tau == 0))
            present.append(p)
        votes = cast(torch.Tensor, sum(t * p for t, p in zip(taus, present)))  # a Tensor: taus is never empty
        sign = torch.sign(votes)
        agree = [p & ((torch.sign(t) == sign) | (t == 0)) for t, p in zip(taus, present)]
        count = torch.stack(agree).sum(0).clamp(min=1)
    return sum(t * a for t, a in zip(taus, agree)) / count


def gram_schmidt(vectors: Sequence[torch.Tensor], eps: float = 1e-8) -> list[torch.Tensor]:
    """Each vector minus its projections on the ones before it (in order); lengths are kept
    for what remains, so a vector that only repeated earlier directions becomes zero."""
    basis: list[torch.Tensor] = []
    out = []
    for v in vectors:
        r = v.float().clone()
        for u in basis:
            r = r - (r @ u) * u
        out.append(r)
        n = r.norm()
        if n > eps * max(1.0, float(v.norm())):
            basis.append(r / n)
    return out
