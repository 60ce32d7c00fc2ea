"""The rack: named steering vectors on the loaded model, each with its own strength, summed
into one forward hook per steered block."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from kedit.engine.errors import KeditError
from kedit.engine.steering.vector import SteeringVector

WHERE = ("all", "generated")


@dataclass
class Slot:
    vector: SteeringVector
    strength: float
    on: bool = True
    relative: bool = False  # strength × the layer's mean norm × the unit direction
    layers: list[int] | None = None  # a subset of the vector's layers; None for all
    where: str = "all"  # every position, or only the tokens being generated


def _strength(value: float) -> float:
    from kedit.engine.checks import finite
    from kedit.engine.steering.inputs import MAX_STRENGTH

    return finite(float(value), "a strength", -MAX_STRENGTH, MAX_STRENGTH)


class SteeringRack:
    """Named vectors with strengths; one forward hook per steered block adds Σ strengthᵢ·vᵢ.

    Every change rebuilds the per-layer sums, and hooks exist only on blocks that get a
    nonzero sum, so an empty or all-off rack leaves the model exactly as loaded.

    Vectors racked for ``generated`` positions add only at absolute positions from the
    prompt's length on. A pre-hook on the model reads how many positions the KV cache
    already holds, so a cached decoding step (one new token at position past) and an
    uncached re-run of the whole sequence mask the same positions. Outside
    ``generating()`` no position is a generated one.

    The session re-encodes the whole conversation for every reply and holds its lock
    for a whole reply, and rack changes take the same lock, so no reply mixes strengths
    and no KV cache outlives the rack state it was computed under.
    """

    def __init__(self, model: torch.nn.Module, adapter: Any) -> None:
        self.model, self.adapter = model, adapter
        self.slots: OrderedDict[str, Slot] = OrderedDict()
        self._sums: dict[str, dict[int, torch.Tensor]] = {w: {} for w in WHERE}
        self._handles: dict[int, Any] = {}
        self._position_hook: Any = None
        self._past = 0  # positions already in the KV cache at the current forward call
        self._prompt_length: int | None = None
        self.version = 0  # counts rebuilds: a new value means the model's outputs may differ

    def add(
        self,
        name: str,
        vector: SteeringVector,
        strength: float,
        *,
        relative: bool = False,
        layers: Sequence[int] | None = None,
        where: str = "all",
    ) -> None:
        if name in self.slots:
            raise KeditError(f"a vector named {name!r} is already in the rack; /steer list shows them")
        if where not in WHERE:
            raise KeditError(f"positions are one of {', '.join(WHERE)}, not {where!r}")
        chosen = None if layers is None else sorted(set(layers))
        if chosen is not None and not set(chosen) <= set(vector.layers):
            raise KeditError(f"the vector has layers {vector.layers}; {chosen} asks for others")
        if relative and not set(chosen or vector.layers) <= set(vector.norms):
            raise KeditError(
                "this vector stores no hidden-state norms for its layers, so a relative "
                "strength has nothing to scale; give an absolute strength"
            )
        self.slots[name] = Slot(vector, _strength(strength), True, relative, chosen, where)
        self._rebuild()

    def state(self) -> list[tuple[str, Slot]]:
        """The slots as they are now, for ``restore``."""
        return [(name, dataclasses.replace(slot)) for name, slot in self.slots.items()]

    def restore(self, state: list[tuple[str, Slot]]) -> None:
        """Put the slots back as ``state()`` saw them (the steering is then exactly that again)."""
        self.slots = OrderedDict((name, dataclasses.replace(slot)) for name, slot in state)
        self._rebuild()

    def remove(self, name: str) -> None:
        self._slot(name)
        del self.slots[name]
        self._rebuild()

    def set(self, name: str, strength: float) -> None:
        self._slot(name).strength = _strength(strength)
        self._rebuild()

    def switch(self, name: str, on: bool) -> None:
        self._slot(name).on = on
        self._rebuild()

    def in_use(self, name: str) -> SteeringVector:
        """The vector as racked: it recommends the strength in use (unless that is relative)."""
        vector, slot = self.vector(name), self._slot(name)
        return vector if slot.relative else dataclasses.replace(vector, strength=slot.strength)

    def vector(self, name: str) -> SteeringVector:
        return self._slot(name).vector

    def _slot(self, name: str) -> Slot:
        if name not in self.slots:
            known = ", ".join(self.slots) or "none"
            raise KeditError(f"no vector named {name!r} in the rack (loaded: {known})")
        return self.slots[name]

    def added(self, layer: int, where: str = "all") -> torch.Tensor | None:
        """What the rack adds to block ``layer``'s output at ``where`` positions, or None."""
        return self._sums[where].get(layer)

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """The model unsteered while this is open (the rack keeps its slots)."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        saved, self._sums = self._sums, {w: {} for w in WHERE}
        try:
            yield
        finally:
            self._sums = saved
            self._rebuild()

    @contextmanager
    def generating(self, prompt_length: int) -> Iterator[None]:
        """Positions from ``prompt_length`` on are generated ones while this is open."""
        self._prompt_length = int(prompt_length)
        try:
            yield
        finally:
            self._prompt_length = None

    @contextmanager
    def probing(self, name: str) -> Iterator[Callable[[float], None]]:
        """A setter for the racked vector ``name``'s strength (on, at every position) while this
        is open, for measuring it; the slot is put back as it was on exit, whatever happens."""
        slot = self._slot(name)
        saved = (slot.strength, slot.on, slot.where)

        def at(strength: float) -> None:
            slot.strength = float(strength)
            self._rebuild()

        try:
            slot.on, slot.where = True, "all"
            yield at
        finally:
            slot.strength, slot.on, slot.where = saved
            self._rebuild()

    def _rebuild(self) -> None:
        self.version += 1  # anything cached about the model's outputs is stale
        sums: dict[str, dict[int, torch.Tensor]] = {w: {} for w in WHERE}
        for slot in self.slots.values():
            if not slot.on or slot.strength == 0.0:
                continue
            for layer in slot.layers or slot.vector.layers:
                d = slot.vector.directions[layer].float()
                if slot.relative:
                    d = d / d.norm().clamp(min=1e-12) * slot.vector.norms[layer]
                sums[slot.where][layer] = sums[slot.where].get(layer, 0) + slot.strength * d
        steered = set(sums["all"]) | set(sums["generated"])
        for layer in list(self._handles):
            if layer not in steered:
                self._handles.pop(layer).remove()
        device = next(self.model.parameters()).device
        self._sums = {w: {layer: v.to(device) for layer, v in by_layer.items()} for w, by_layer in sums.items()}
        for layer in sorted(steered):
            if layer not in self._handles:
                self._handles[layer] = self.adapter.layer(layer).register_forward_hook(self._hook(layer))
        if sums["generated"] and self._position_hook is None:
            self._position_hook = self.model.register_forward_pre_hook(self._note_past, with_kwargs=True)
        elif not sums["generated"] and self._position_hook is not None:
            self._position_hook.remove()
            self._position_hook = None

    def _note_past(self, module, args, kwargs):
        # transformers 5.24 passes the KV cache as ``cache``; earlier 5.x as ``past_key_values``
        cache = next((kwargs[k] for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
        self._past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0

    def _hook(self, layer: int):
        def hook(module, args, output):
            every, generated = self._sums["all"].get(layer), self._sums["generated"].get(layer)
            if every is None and (generated is None or self._prompt_length is None):
                return output
            hidden = self.adapter.residual(output)
            add = 0 if every is None else every.to(hidden.dtype)
            if generated is not None and self._prompt_length is not None:
                positions = self._past + torch.arange(hidden.shape[1], device=hidden.device)
                mask = (positions >= self._prompt_length).to(hidden.dtype)[:, None]
                add = add + mask * generated.to(hidden.dtype)
            return self.adapter.replace_residual(output, hidden + add)

        return hook

    def rows(self) -> list[tuple[str, ...]]:
        return [
            (
                name,
                "on" if s.on else "off",
                f"{s.strength:g}{' × norm' if s.relative else ''}",
                _recommended(s.vector),
                _span(s.layers or s.vector.layers),
                s.where,
                s.vector.method,
            )
            for name, s in self.slots.items()
        ]


def _recommended(vector: SteeringVector) -> str:
    """The /steer list cell: the measured strength, a magnitude ('+': no limit found up to it), or '-'."""
    rec = vector.recommended
    return "-" if rec is None else f"±{rec.strength:g}{'+' if rec.capped else ''}"


def _span(layers: Sequence[int]) -> str:
    return (
        f"{layers[0]}-{layers[-1]}"
        if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1))
        else ",".join(map(str, layers))
    )
