"""Steering vectors: trained from contrastive pairs, added to decoder-layer outputs, stacked
in a rack with their own strengths, stored as safetensors.

A vector holds one direction per decoder layer, indexed as Hugging Face numbers the blocks
(0-based): direction L is added to the output of block L. Its metadata records the model
family and hidden size (a vector for another model is refused), how it was trained, and the
mean norm of the hidden state at each layer, so a strength can be given relative to it.

Training reads each layer's output at the answer: the mean over a completion's tokens
(``read="answer"``) or one token index (``read=-1`` for the last). Rows are padded on the
right and read by their own lengths, so padding never enters a mean.

- ``mean_diff`` (CAA): the mean of (positive − negative).
- ``pca``: the first principal component of the pairs centred on each pair's midpoint
  (±(positive − negative)/2), signed so positives project above negatives, scaled to the
  mean projection of the differences on it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.engine.errors import KeditError
from kedit.engine.metrics import pad_right

FORMAT = "kedit-steering/1"
METHODS = ("mean_diff", "pca")


@dataclass(frozen=True)
class Pair:
    prompt: str
    positive: str  # completions, with the leading space a continuation needs
    negative: str


@dataclass
class SteeringVector:
    directions: dict[int, torch.Tensor]  # decoder block (0-based) -> (hidden,) float32
    model_type: str
    hidden_size: int
    method: str
    norms: dict[int, float]  # mean norm of the block's output at the read positions
    strength: float = 1.0  # recommended
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def save(self, path: Path) -> Path:
        """One tensor per layer (``layer.L``) and JSON metadata, written atomically."""
        import os
        import tempfile

        from safetensors.torch import save_file

        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "model_type": self.model_type, "hidden_size": self.hidden_size,
                "method": self.method, "layers": self.layers, "norms": {str(k): v for k, v in self.norms.items()},
                "strength": self.strength, "meta": self.meta}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({f"layer.{layer}": d.detach().float().cpu().contiguous() for layer, d in self.directions.items()},
                      tmp, metadata={"kedit": json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: Path) -> SteeringVector:
        from safetensors import SafetensorError, safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise KeditError(f"no steering vector at {path}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {})["kedit"])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise KeditError(f"{path} is not a kedit steering vector ({exc})") from None
        if meta.get("format") != FORMAT:
            raise KeditError(f"{path} has format {meta.get('format')!r}; this kedit reads {FORMAT}")
        directions = {int(k.split(".", 1)[1]): v.float() for k, v in tensors.items() if k.startswith("layer.")}
        return cls(directions, meta["model_type"], int(meta["hidden_size"]), meta["method"],
                   {int(k): float(v) for k, v in meta.get("norms", {}).items()}, float(meta.get("strength", 1.0)),
                   meta.get("meta", {}))

    def check_fits(self, handle) -> None:
        """Refuse a vector made for another hidden size or model family, saying which."""
        hidden = int(handle.model.config.hidden_size)
        if self.hidden_size != hidden:
            raise KeditError(f"this vector is for hidden size {self.hidden_size} ({self.model_type}); "
                             f"the loaded model has {hidden}")
        if self.model_type != handle.adapter.model_type:
            raise KeditError(f"this vector was trained on a {self.model_type} model; the loaded one is "
                             f"{handle.adapter.model_type}")
        n = handle.adapter.n_layers
        bad = [layer for layer in self.layers if not 0 <= layer < n]
        if bad:
            raise KeditError(f"this vector has layers {bad}, but the model has {n} (0-{n - 1})")


# -- training ----------------------------------------------------------------------------


@torch.no_grad()
def read_states(handle, texts: Sequence[tuple[str, str]], layers: Sequence[int],
                read: str | int = "answer") -> torch.Tensor:
    """Block outputs at the read positions: (n texts, len(layers), hidden), float32.

    Each text is (prompt, completion); ``read="answer"`` averages the completion's tokens,
    an int picks one token of prompt + completion (negative counts from its end).
    """
    tok, model = handle.tokenizer, handle.model
    device = next(model.parameters()).device
    rows, spans = [], []
    for prompt, completion in texts:
        p = tok(prompt)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        if not c and read == "answer":
            raise KeditError(f"the completion after {prompt!r} is empty")
        ids = list(p) + list(c)
        if read == "answer":
            spans.append((len(p), len(ids)))
        else:
            i = int(read) if int(read) >= 0 else len(ids) + int(read)
            if not 0 <= i < len(ids):
                raise KeditError(f"token index {read} is outside a {len(ids)}-token text")
            spans.append((i, i + 1))
        rows.append(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for start in range(0, len(rows), 32):
        ids, mask = pad_right(rows[start:start + 32], pad, device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for j, (a, b) in enumerate(spans[start:start + 32]):
            out.append(torch.stack([hidden[layer + 1][j, a:b].float().mean(0) for layer in layers]))
    return torch.stack(out)


def train_vector(handle, pairs: Sequence[Pair], method: str = "mean_diff", layers: Sequence[int] | None = None,
                 read: str | int = "answer") -> SteeringVector:
    """A steering vector from contrastive pairs (see the module docstring)."""
    if method not in METHODS:
        raise KeditError(f"unknown steering method {method!r}; available: {', '.join(METHODS)}")
    if not pairs:
        raise KeditError("no contrastive pairs to train on")
    if method == "pca" and len(pairs) < 2:
        raise KeditError("PCA needs at least two pairs; use mean_diff for a single pair")
    n_layers = handle.adapter.n_layers
    layers = list(range(n_layers)) if layers is None else sorted(set(layers))
    if any(not 0 <= layer < n_layers for layer in layers):
        raise KeditError(f"layers must be within 0-{n_layers - 1}")
    pos = read_states(handle, [(p.prompt, p.positive) for p in pairs], layers, read)
    neg = read_states(handle, [(p.prompt, p.negative) for p in pairs], layers, read)
    diffs = pos - neg  # (n, L, hidden)
    directions = {}
    for i, layer in enumerate(layers):
        d = diffs[:, i]
        if method == "mean_diff":
            directions[layer] = d.mean(0)
        else:
            halves = torch.cat([d / 2, -d / 2])  # each pair centred on its midpoint
            v = torch.linalg.svd(halves, full_matrices=False).Vh[0]
            proj = d @ v
            if proj.mean() < 0:
                v, proj = -v, -proj
            directions[layer] = v * proj.mean()
    norms = {layer: float(torch.cat([pos[:, i], neg[:, i]]).norm(dim=-1).mean()) for i, layer in enumerate(layers)}
    return SteeringVector(directions, handle.adapter.model_type, int(handle.model.config.hidden_size), method, norms,
                          meta={"pairs": len(pairs), "read": read})


# -- application --------------------------------------------------------------------------


@dataclass
class Slot:
    vector: SteeringVector
    strength: float
    on: bool = True
    relative: bool = False  # strength × the layer's mean norm × the unit direction
    layers: list[int] | None = None  # a subset of the vector's layers; None for all


class SteeringRack:
    """Named vectors with strengths; one forward hook per steered block adds Σ strengthᵢ·vᵢ.

    Every change rebuilds the per-layer sums, and hooks exist only on blocks that get a
    nonzero sum, so an empty or all-off rack leaves the model exactly as loaded. Kedit
    re-encodes the whole prompt for every reply, so a change applies to the next one
    with no stale cache.
    """

    def __init__(self, model: torch.nn.Module, adapter: Any) -> None:
        self.model, self.adapter = model, adapter
        self.slots: OrderedDict[str, Slot] = OrderedDict()
        self._sums: dict[int, torch.Tensor] = {}
        self._handles: dict[int, Any] = {}

    def add(self, name: str, vector: SteeringVector, strength: float, *, relative: bool = False,
            layers: Sequence[int] | None = None) -> None:
        if name in self.slots:
            raise KeditError(f"a vector named {name!r} is already in the rack; /steer list shows them")
        chosen = None if layers is None else sorted(set(layers))
        if chosen is not None and not set(chosen) <= set(vector.layers):
            raise KeditError(f"the vector has layers {vector.layers}; {chosen} asks for others")
        self.slots[name] = Slot(vector, float(strength), True, relative, chosen)
        self._rebuild()

    def remove(self, name: str) -> None:
        self._slot(name)
        del self.slots[name]
        self._rebuild()

    def set(self, name: str, strength: float) -> None:
        self._slot(name).strength = float(strength)
        self._rebuild()

    def switch(self, name: str, on: bool) -> None:
        self._slot(name).on = on
        self._rebuild()

    def vector(self, name: str) -> SteeringVector:
        return self._slot(name).vector

    def _slot(self, name: str) -> Slot:
        if name not in self.slots:
            known = ", ".join(self.slots) or "none"
            raise KeditError(f"no vector named {name!r} in the rack (loaded: {known})")
        return self.slots[name]

    def added(self, layer: int) -> torch.Tensor | None:
        """What the rack adds to block ``layer``'s output, or None."""
        return self._sums.get(layer)

    def _rebuild(self) -> None:
        sums: dict[int, torch.Tensor] = {}
        for slot in self.slots.values():
            if not slot.on or slot.strength == 0.0:
                continue
            for layer in slot.layers or slot.vector.layers:
                d = slot.vector.directions[layer].float()
                if slot.relative:
                    d = d / d.norm().clamp(min=1e-12) * slot.vector.norms.get(layer, 1.0)
                sums[layer] = sums.get(layer, 0) + slot.strength * d
        for layer in list(self._handles):
            if layer not in sums:
                self._handles.pop(layer).remove()
        device = next(self.model.parameters()).device
        self._sums = {layer: s.to(device) for layer, s in sums.items()}
        for layer in sums:
            if layer not in self._handles:
                self._handles[layer] = self.adapter.layer(layer).register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def hook(module, args, output):
            add = self._sums.get(layer)
            if add is None:
                return output
            hidden = self.adapter.residual(output)
            return self.adapter.replace_residual(output, hidden + add.to(hidden.dtype))

        return hook

    def rows(self) -> list[tuple[str, ...]]:
        return [(name, "on" if s.on else "off", f"{s.strength:g}{' × norm' if s.relative else ''}",
                 _span(s.layers or s.vector.layers), s.vector.method) for name, s in self.slots.items()]


def _span(layers: Sequence[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)) \
        else ",".join(map(str, layers))


def parse_layers(text: str | None) -> list[int] | None:
    """'8-14', '3,5,7' or '4' -> layer indices; None stays None."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise KeditError(f"layers look like 8-14 or 3,5,7, not {text!r}") from None
    return out


def read_pairs(path: Path) -> list[Pair]:
    """Contrastive pairs from JSONL: one {"prompt", "positive", "negative"} object per line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KeditError(f"no pairs file at {path}")
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append(Pair(row["prompt"], row["positive"], row["negative"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise KeditError(f"{path}:{n}: expected a JSON object with prompt, positive and negative ({exc})") from None
    return pairs
