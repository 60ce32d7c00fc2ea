"""GRACE (Hartvigsen et al. 2023): a codebook of (key, value, radius) beside one layer.

The codebook sits on a layer's MLP output projection. Its keys are that module's input at
the last token of an edited prompt; when an input lies within a key's deferral radius ε,
the module's output there is replaced by the key's trained value, else the layer runs as
it was. Matching is done per position on every call, from the call's own input, so no
position or key is carried from one call to the next: a cached decode step is matched
like any other token.

Adding an edit (key h, label y), with the nearest key k at distance d:
- no key, or d > ε_k + ε_init: a new entry (h, value, ε_init);
- d ≤ ε_k + ε_init and k's label is y: k's radius grows to d, so it covers h;
- d ≤ ε_k + ε_init and the labels differ: both radii become d / 2 (split), new entry added.
  Where h is k itself (d ≈ 0), the new label takes the entry over instead.

Labels are the target's token ids, compared as sequences. Every change to an entry is a
layer on that entry's history, tagged with the edit that made it; the entry's current
state is its top layer. Rolling an edit back removes its layers wherever they are, so the
codebook is exactly what the remaining edits made, and an entry with no layers left is
gone. With no entries left the hook is removed and the module is exactly as loaded.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from kedit.engine.methods import EditRequest, MethodParams
from kedit.engine.metrics import encode_pair
from kedit.engine.methods.rome.value import frozen
from kedit.engine.methods.upper import from_layer
from kedit.engine.patches import TogglePatch, all_attached, attached


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


@dataclass(eq=False)
class Layer:
    """One edit's say on an entry: the radius, value and label it set."""

    edit_id: str
    radius: float
    value: torch.Tensor
    label: tuple[int, ...]


@dataclass(eq=False)
class Entry:
    key: torch.Tensor  # float32 (in,)
    history: list[Layer] = field(default_factory=list)

    @property
    def top(self) -> Layer:
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
        d = torch.linalg.vector_norm(self._keys - key.float()[None], dim=-1)
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

    def push(self, layers: list[tuple[Entry, Layer]]) -> None:
        for entry, layer in layers:
            if entry not in self.entries:
                self.entries.append(entry)
            entry.history.append(layer)
        self._rebuild()

    def drop(self, edit_id: str) -> None:
        for entry in self.entries:
            entry.history = [layer for layer in entry.history if layer.edit_id != edit_id]
        self._rebuild()

    def restore(self, entries: list[Entry]) -> None:
        """Take over entries whose histories are already filled in (a loaded session)."""
        self.entries = list(entries)
        self._rebuild()

    def state(self) -> dict[str, Any]:
        radii = [e.top.radius for e in self.entries]
        return {"module": self.name, "entries": len(self.entries),
                "radius min": min(radii) if radii else None,
                "radius median": statistics.median(radii) if radii else None,
                "radius max": max(radii) if radii else None,
                "positions replaced": self.replaced}


def codebook(model: nn.Module, module: nn.Module, name: str) -> GraceCodebook:
    return attached(model, "grace", name, lambda: GraceCodebook(module, name))


def codebooks(model: nn.Module) -> dict[str, GraceCodebook]:
    return all_attached(model, "grace")


class GracePatch(TogglePatch):
    """One edit's layers on one codebook."""

    def __init__(self, book: GraceCodebook, edit_id: str, layers: list[tuple[Entry, Layer]]) -> None:
        self.book, self.key, self.layers = book, edit_id, layers

    def _apply(self) -> None:
        self.book.push(self.layers)

    def _revert(self) -> None:
        self.book.drop(self.key)


# -- computing an edit -----------------------------------------------------------------


@torch.no_grad()
def _key_and_output(model, tokenizer, module, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's input and output at the prompt's last token, codebook included."""
    from kedit.engine.methods.rome.key import capture_io

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    with capture_io(module) as seen:
        model(input_ids=ids)
    return seen["input"][0, -1].float(), seen["output"][0, -1].float()


def train_value(model, tokenizer, module, prompt: str, target: str, init: torch.Tensor,
                hp: GraceParams, progress: Callable[[int, float], None] | None = None, *, adapter=None,
                layer: int = 0) -> tuple[torch.Tensor, float, float, int]:
    """A value that, put out at the prompt's last token, makes the model say ``target``.

    With ``adapter`` and ``layer`` (the block of ``module``), passes after the first skip the
    blocks below it (kedit.engine.methods.upper).
    """
    device = next(model.parameters()).device
    prompt_ids, target_ids = encode_pair(tokenizer, prompt, target)
    ids = torch.tensor([prompt_ids + target_ids[:-1]], device=device)
    pos = len(prompt_ids) - 1
    tgt = torch.tensor(target_ids, device=device)
    at = torch.arange(len(target_ids), device=device)  # the target's places among the kept logits
    value = init.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([value], lr=hp.lr)

    def hook(mod, args, output):
        out = output.clone()
        out[0, pos] = value.to(out.dtype)
        return out

    first = nll = float("nan")
    steps = 0
    with frozen(model), from_layer(adapter, layer):
        handle = module.register_forward_hook(hook)
        try:
            for step in range(hp.n_iter + 1):
                # the target's positions are the last len(target) ones: logits there only
                logits = model(input_ids=ids, logits_to_keep=len(target_ids)).logits[0].float()
                loss = -torch.log_softmax(logits, dim=-1)[at, tgt].mean()
                nll = float(loss.detach())
                first = nll if step == 0 else first
                if progress:
                    progress(step, nll)
                if nll < hp.nll_stop or step == hp.n_iter:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
                if not torch.isfinite(value).all():
                    raise FloatingPointError("the GRACE value became NaN or infinite")
        finally:
            handle.remove()
    return value.detach(), first, nll, steps


def apply_grace(handle, request: EditRequest, hp: GraceParams, layer: int, edit_id: str,
                progress: Callable[[str, int, int], None] | None = None) -> tuple[GracePatch, dict[str, Any]]:
    """The edit's codebook layers (not yet applied); the model is left untouched."""
    model, tok, adapter = handle.model, handle.tokenizer, handle.adapter
    module, name = adapter.mlp_out(layer), adapter.mlp_out_name(layer)
    book = codebook(model, module, name)
    key, out = _key_and_output(model, tok, module, request.prompt)
    label = tuple(tok(request.target, add_special_tokens=False)["input_ids"])
    _, d = book.nearest(key)

    def tick(step: int, nll: float) -> None:
        if progress:
            progress("training the GRACE value", step, hp.n_iter)

    info: dict[str, Any] = {"layer": layer, "module": name, "key_distance": d}

    def value() -> torch.Tensor:
        v, first, nll, steps = train_value(model, tok, module, request.prompt, request.target, out, hp, tick,
                                            adapter=adapter, layer=layer)
        info.update(nll_before=first, nll_after=nll, value_steps=steps)
        return v

    layers, action, radius = place(book, key, label, edit_id, hp, value)
    info.update(action=action, radius=radius)
    return GracePatch(book, edit_id, layers), info


def place(book: GraceCodebook, key: torch.Tensor, label: tuple[int, ...], edit_id: str, hp: GraceParams,
          value: Callable[[], torch.Tensor]) -> tuple[list[tuple[Entry, Layer]], str, float]:
    """The codebook layers an edit adds (see the module docstring), the action and the radius.

    ``value()`` trains the new value; it is called only when the edit needs one.
    """
    i, d = book.nearest(key)
    near = book.entries[i] if i >= 0 else None
    if near is not None and d <= near.top.radius + hp.eps_init and near.top.label == label:
        radius = max(near.top.radius, d)  # covered, same answer: grow the radius to reach the new key
        return [(near, replace(near.top, edit_id=edit_id, radius=radius))], "expanded", radius
    if near is not None and d <= hp.same_key:
        return [(near, Layer(edit_id, near.top.radius, value(), label))], "replaced", near.top.radius
    if near is not None and d <= near.top.radius + hp.eps_init:
        half = d / 2
        radius = min(half, hp.eps_init)
        return [(near, replace(near.top, edit_id=edit_id, radius=min(near.top.radius, half))),
                (Entry(key.float()), Layer(edit_id, radius, value(), label))], "split", radius
    return [(Entry(key.float()), Layer(edit_id, hp.eps_init, value(), label))], "added", hp.eps_init
