"""GRACE's settings (kedit.toml [grace])."""

from __future__ import annotations

from dataclasses import dataclass

from kedit.engine.methods.base import MethodParams


@dataclass(frozen=True)
class GraceParams(MethodParams):
    section = "grace"
    layer: int | None = None  # None: layer_share of the way up the stack
    layer_share: float = 0.85  # Llama-2-7B's published GRACE layer is 27 of 32
    eps_init: float = 1.0  # initial deferral radius, in the key's own units (Euclidean)
    n_iter: int = 100  # Adam steps on a new value
    lr: float = 1.0
    nll_stop: float = 0.01  # stop training the value once the target's NLL is below this
    same_key: float = 1e-6  # keys closer than this are the same key
