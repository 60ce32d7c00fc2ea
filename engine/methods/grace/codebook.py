"""GRACE's codebook: entries of (key, value, radius) on one module, and its patch.

See kedit.engine.methods.grace for the method.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from kedit.engine.methods.grace.params import GraceParams
from kedit.engine.patches import TogglePatch, all_attached, attached


@dataclass(eq=False)
class Revision:
    """One revision of a codebook entry: the radius, value and label one edit set."""

    edit_id: str
    radius: float
    value: torch.Tensor
    label: tuple[int, ...]


@dataclass(eq=False)
class Entry:
    key: torch.Tensor  # float32 (in,)
    history: list[Revision] = field(default_factory=list)

    @property
    def top(self) -> Revision:
        return self.history[-1]


class GraceCodebook:
    """The codebook on one module, as a forward hook; one per edited module."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module, self.name = module, name
        self.entries: list[Entry] = []
        self._handle: Any = None
        self._keys: torch.Tensor | None = None
        self._radii: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self.calls = 0
        self.replaced = 0  # positions whose output came from the codebook

    # -- lookup ----------------------------------------------------------------------

    def nearest(self, key: torch.Tensor) -> tuple[int, float]:
        """Index and distance of the nearest key (-1, inf when empty)."""
        if not self.entries:
            return -1, float("inf")
        keys = self._keys
        assert keys is not None  # _rebuild stacks the keys whenever there are entries
        d = torch.linalg.vector_norm(keys - key.float()[None], dim=-1)
        i = int(d.argmin())
        return i, float(d[i])

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        keys, radii, values = self._keys, self._radii, self._values
        if keys is None or radii is None or values is None:
            return output
        x = args[0].float()
        d = torch.cdist(x.reshape(-1, x.shape[-1]), keys).reshape(*x.shape[:-1], keys.shape[0])
        dist, idx = d.min(dim=-1)
        hit = dist <= radii[idx]
        self.calls += 1
        if not bool(hit.any()):
            return output
        self.replaced += int(hit.sum())
        out = output.clone()
        out[hit] = values[idx[hit]].to(out.dtype)
        return out

    # -- changes -----------------------------------------------------------------------

    def _rebuild(self) -> None:
        self.entries = [e for e in self.entries if e.history]
        if not self.entries:
            self._keys = self._radii = self._values = None
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            return
        self._keys = torch.stack([e.key for e in self.entries])
        self._radii = torch.tensor([e.top.radius for e in self.entries], device=self._keys.device)
        self._values = torch.stack([e.top.value for e in self.entries])
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)

    def push(self, revisions: list[tuple[Entry, Revision]]) -> None:
        for entry, revision in revisions:
            if entry not in self.entries:
                self.entries.append(entry)
            entry.history.append(revision)
        self._rebuild()

    def drop(self, edit_id: str) -> None:
        for entry in self.entries:
            entry.history = [rev for rev in entry.history if rev.edit_id != edit_id]
        self._rebuild()

    def restore(self, entries: list[Entry]) -> None:
        """Take over entries whose histories are already filled in (a loaded session)."""
        self.entries = list(entries)
        self._rebuild()

    def state(self) -> dict[str, Any]:
        radii = [e.top.radius for e in self.entries]
        return {
            "module": self.name,
            "entries": len(self.entries),
            "radius min": min(radii) if radii else None,
            "radius median": statistics.median(radii) if radii else None,
            "radius max": max(radii) if radii else None,
            "positions replaced": self.replaced,
        }


def codebook(model: nn.Module, module: nn.Module, name: str) -> GraceCodebook:
    return attached(model, "grace", name, lambda: GraceCodebook(module, name))


def codebooks(model: nn.Module) -> dict[str, GraceCodebook]:
    return all_attached(model, "grace")


class GracePatch(TogglePatch):
    """One edit's revisions on one codebook."""

    def __init__(self, book: GraceCodebook, edit_id: str, revisions: list[tuple[Entry, Revision]]) -> None:
        self.book, self.key, self.revisions = book, edit_id, revisions

    def _apply(self) -> None:
        self.book.push(self.revisions)

    def _revert(self) -> None:
        self.book.drop(self.key)

    def adopt(self) -> None:
        """Count as applied: a loaded session filled its revisions into the entries' histories,
        which the codebook takes over at the end of the load (``GraceCodebook.restore``)."""
        for entry, revision in self.revisions:
            entry.history.append(revision)
        self.applied = True


def place(
    book: GraceCodebook,
    key: torch.Tensor,
    label: tuple[int, ...],
    edit_id: str,
    hp: GraceParams,
    value: Callable[[], torch.Tensor],
) -> tuple[list[tuple[Entry, Revision]], str, float]:
    """The codebook revisions an edit makes (see kedit.engine.methods.grace), the action and the radius.

    ``value()`` trains the new value; it is called only when the edit needs one.
    """
    i, d = book.nearest(key)
    near = book.entries[i] if i >= 0 else None
    if near is not None and d <= near.top.radius + hp.eps_init and near.top.label == label:
        radius = max(near.top.radius, d)  # covered, same answer: grow the radius to reach the new key
        return [(near, replace(near.top, edit_id=edit_id, radius=radius))], "expanded", radius
    if near is not None and d <= hp.same_key:
        return [(near, Revision(edit_id, near.top.radius, value(), label))], "replaced", near.top.radius
    if near is not None and d <= near.top.radius + hp.eps_init:
        half = d / 2
        radius = min(half, hp.eps_init)
        return (
            [
                (near, replace(near.top, edit_id=edit_id, radius=min(near.top.radius, half))),
                (Entry(key.float()), Revision(edit_id, radius, value(), label)),
            ],
            "split",
            radius,
        )
    return [(Entry(key.float()), Revision(edit_id, hp.eps_init, value(), label))], "added", hp.eps_init
