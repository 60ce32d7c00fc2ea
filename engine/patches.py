"""Patches: every change kedit makes to a model, each with an exact ``revert()``.

Weight edits never touch the layer's own weights. A ``LowRankSidecar`` sits beside one
linear module as a forward hook and adds ``U_e (V_eᵀ x)`` for every active edit e, so
it works the same on dense, 4-bit and 8-bit layers. Removing the last edit removes the
hook, which leaves the module exactly as it was loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class Patch(Protocol):
    """A reversible change to a model."""

    def apply(self) -> None: ...

    def revert(self) -> None: ...


class LowRankSidecar:
    """Adds Σₑ Uₑ Vₑᵀ x to one module's output; one per edited module (as one product Σ Vₑ Uₑᵀ
    once the factors' total rank makes that the cheaper one).

    Factors are kept per edit, in order, and concatenated for the forward pass, so
    taking out any edit leaves the others' factors untouched, and taking out the
    latest one restores the previous concatenation exactly.
    """

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self.factors: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        # the keys (m, in) each edit in force was written for, where it gave them: later edits keep them
        self.keys: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._handle: Any = None
        self._u: torch.Tensor | None = None  # (out, r): every edit's U side by side
        self._v: torch.Tensor | None = None  # (in, r)
        self._dense: torch.Tensor | None = None  # V Uᵀ (in, out), once that is the cheaper product

    def add(self, key: str, u: torch.Tensor, v: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        """Add an edit's factors: u is (out, r), v is (in, r); ``keys`` (m, in), the inputs it
        was written for, if it gives them."""
        if key in self.factors:
            raise ValueError(f"{key} is already applied to {self.name}")
        self.factors[key] = (u.detach(), v.detach())
        if keys is not None:
            self.keys[key] = keys.detach()
        self._rebuild()

    def remove(self, key: str) -> None:
        del self.factors[key]
        self.keys.pop(key, None)
        self._rebuild()

    def edited_keys(self) -> torch.Tensor | None:
        """The keys of the edits in force that gave theirs, as rows; None if none did."""
        return torch.cat(list(self.keys.values())) if self.keys else None

    def _rebuild(self) -> None:
        if not self.factors:
            self._u = self._v = self._dense = None
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            return
        self._u = torch.cat([u for u, _ in self.factors.values()], dim=1).contiguous()
        self._v = torch.cat([v for _, v in self.factors.values()], dim=1).contiguous()
        # (x V) Uᵀ costs r (in + out) a token, x (V Uᵀ) in · out: past that rank (many batches of
        # many facts) the product is formed once. It is a function of the factors in force only,
        # so taking an edit out gives back exactly what was there before it
        wide = self._u.shape[1] * (self._u.shape[0] + self._v.shape[0]) > self._u.shape[0] * self._v.shape[0]
        self._dense = (self._v @ self._u.T).contiguous() if wide else None
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        u, v = self._u, self._v
        if u is None or v is None:
            return output
        delta = x.to(v.dtype) @ self._dense if self._dense is not None else (x.to(v.dtype) @ v) @ u.T
        return output + delta.to(output.dtype)

    @property
    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every edit's factors side by side, (U (out, r), V (in, r)); None with no edits."""
        return None if self._u is None or self._v is None else (self._u, self._v)

    @property
    def rank(self) -> int:
        return 0 if self._u is None else self._u.shape[1]


def attached(model: nn.Module, kind: str, name: str, make: Callable[[], T]) -> T:
    """The ``kind`` of object kedit keeps beside module ``name`` (a sidecar, a GRACE codebook,
    a WISE memory), kept on the model and made by ``make()`` on first use."""
    table: dict[str, Any] = model.__dict__.setdefault(f"_kedit_{kind}", {})
    if name not in table:
        table[name] = make()
    return table[name]


def all_attached(model: nn.Module, kind: str) -> dict[str, Any]:
    return model.__dict__.get(f"_kedit_{kind}", {})


def sidecar(model: nn.Module, module: nn.Module, name: str) -> LowRankSidecar:
    """The sidecar on ``module``, created on first use and kept on the model."""
    return attached(model, "sidecars", name, lambda: LowRankSidecar(module, name))


def sidecars(model: nn.Module) -> dict[str, LowRankSidecar]:
    return all_attached(model, "sidecars")


class TogglePatch:
    """A patch that knows whether it is in force: ``apply`` and ``revert`` do their work once.
    Subclasses implement ``_apply`` and ``_revert``."""

    applied = False

    def apply(self) -> None:
        if not self.applied:
            self._apply()
            self.applied = True

    def revert(self) -> None:
        if self.applied:
            self._revert()
            self.applied = False

    def _apply(self) -> None:
        raise NotImplementedError

    def _revert(self) -> None:
        raise NotImplementedError


class LowRankPatch(TogglePatch):
    """One edit's factors on one sidecar, and the keys it was written for (``keys``, optional)."""

    def __init__(
        self, side: LowRankSidecar, key: str, u: torch.Tensor, v: torch.Tensor, keys: torch.Tensor | None = None
    ) -> None:
        self.side, self.key, self.u, self.v, self.keys = side, key, u, v, keys

    def _apply(self) -> None:
        self.side.add(self.key, self.u, self.v, self.keys)

    def _revert(self) -> None:
        self.side.remove(self.key)
