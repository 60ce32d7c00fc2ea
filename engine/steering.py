"""Steering vectors: trained from contrastive pairs, added to decoder-layer outputs, stacked
in a rack with their own strengths, stored as safetensors.

A vector holds one direction per decoder layer, indexed as Hugging Face numbers the blocks
(0-based): direction L is added to the output of block L. Its metadata records the model
family and hidden size (a vector for another model is refused), how it was trained, and the
mean norm of the hidden state at each layer, so a strength can be given relative to it, and
the strength measured to be safe on that model (see ``recommend_strength``).

Training reads each layer's output at the answer: the mean over a completion's tokens
(``read="answer"``) or one token index (``read=-1`` for the last). Rows are padded on the
right and read by their own lengths, so padding never enters a mean.

- ``mean_diff`` (CAA): the mean of (positive − negative).
- ``pca``: the first principal component of the pairs centred on each pair's midpoint
  (±(positive − negative)/2), signed so positives project above negatives, scaled to the
  mean projection of the differences on it.
"""

from __future__ import annotations

import dataclasses

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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


@dataclass(frozen=True)
class Recommendation:
    """The largest strength found whose neutral-text perplexity stays within ``limit`` × the
    unsteered model's, both ways: a magnitude; +strength steers the vector's way, −strength
    the other."""

    strength: float
    limit: float  # allowed perplexity / unsteered perplexity
    ratio: float  # perplexity at +strength / unsteered
    opposite: float  # perplexity at −strength / unsteered
    tried: tuple[tuple[float, float], ...]  # (strength, ratio) in the order measured
    capped: bool = False  # even the search's largest strength stayed within the limit
    neutral: str = "built-in"  # where the neutral text came from

    def to_json(self) -> dict[str, Any]:
        return {"strength": self.strength, "limit": self.limit, "ratio": self.ratio, "opposite": self.opposite,
                "tried": [list(t) for t in self.tried], "capped": self.capped, "neutral": self.neutral}

    @classmethod
    def from_json(cls, data: Any) -> Recommendation | None:
        """None for files without one (or with one this kedit cannot read)."""
        try:
            return cls(float(data["strength"]), float(data["limit"]), float(data["ratio"]),
                       float(data["opposite"]), tuple((float(a), float(b)) for a, b in data.get("tried", ())),
                       bool(data.get("capped", False)), str(data.get("neutral", "")))
        except (KeyError, TypeError, ValueError):
            return None

    def describe(self) -> str:
        """One line: the strength and what it costs, for /steer train, add and save."""
        bound = "at least " if self.capped else ""
        return (f"recommended strength {bound}±{self.strength:g}: neutral perplexity {self.ratio:.2f}× the "
                f"unsteered model's at +{self.strength:g}, {self.opposite:.2f}× at −{self.strength:g} "
                f"(limit {self.limit:g}×)")


@dataclass
class SteeringVector:
    directions: dict[int, torch.Tensor]  # decoder block (0-based) -> (hidden,) float32
    model_type: str  # "" when the file did not say (EasyEdit2); then only the hidden size is checked
    hidden_size: int
    method: str
    norms: dict[int, float]  # mean norm of the block's output at the read positions; {} if unknown
    strength: float = 1.0  # the strength to rack it at: /steer save records the one in use
    meta: dict[str, Any] = field(default_factory=dict)
    recommended: Recommendation | None = None  # measured on the model at training; None if never measured

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def save(self, path: Path) -> Path:
        """One tensor per layer (``layer.L``) and JSON metadata, written atomically."""
        from safetensors.torch import save_file

        from kedit.engine.paths import atomic_path

        path = Path(path).expanduser()
        meta = {"format": FORMAT, "model_type": self.model_type, "hidden_size": self.hidden_size,
                "method": self.method, "layers": self.layers, "norms": {str(k): v for k, v in self.norms.items()},
                "strength": self.strength, "meta": self.meta}
        if self.recommended is not None:
            meta["recommended"] = self.recommended.to_json()
        with atomic_path(path) as tmp:
            save_file({f"layer.{layer}": d.detach().float().cpu().contiguous() for layer, d in self.directions.items()},
                      tmp, metadata={"kedit": json.dumps(meta)})
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
                   meta.get("meta", {}), Recommendation.from_json(meta.get("recommended")))

    def check_fits(self, handle) -> None:
        """Refuse a vector made for another hidden size or model family, saying which."""
        hidden = int(handle.model.config.hidden_size)
        if self.hidden_size != hidden:
            raise KeditError(f"this vector is for hidden size {self.hidden_size} ({self.model_type}); "
                             f"the loaded model has {hidden}")
        if self.model_type and self.model_type != handle.adapter.model_type:
            raise KeditError(f"this vector was trained on a {self.model_type} model; the loaded one is "
                             f"{handle.adapter.model_type}")
        n = handle.adapter.n_layers
        bad = [layer for layer in self.layers if not 0 <= layer < n]
        if bad:
            raise KeditError(f"this vector has layers {bad}, but the model has {n} (0-{n - 1})")


# -- training ----------------------------------------------------------------------------


@torch.no_grad()
def read_states(handle, texts: Sequence[tuple[str, str]], layers: Sequence[int],
                read: str | int = "answer", progress: Any = None) -> torch.Tensor:
    """Block outputs at the read positions: (n texts, len(layers), hidden), float32.

    Each text is (prompt, completion); ``read="answer"`` averages the completion's tokens,
    an int picks one token of prompt + completion (negative counts from its end). The
    states are taken by hooks on the blocks themselves, the very tensors a steering hook
    adds to (``output_hidden_states`` gives the last block's output after the final norm).
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
    adapter = handle.adapter
    seen: dict[int, torch.Tensor] = {}
    hooks = [adapter.layer(layer).register_forward_hook(
        lambda module, args, output, layer=layer: seen.__setitem__(layer, adapter.residual(output)))
        for layer in layers]
    out = []
    try:
        for start in range(0, len(rows), 32):
            ids, mask = pad_right(rows[start:start + 32], pad, device)
            model(input_ids=ids, attention_mask=mask)
            for j, (a, b) in enumerate(spans[start:start + 32]):
                out.append(torch.stack([seen[layer][j, a:b].float().mean(0) for layer in layers]))
            if progress is not None:
                progress("reading hidden states", len(out), len(rows))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(out)


def train_vector(handle, pairs: Sequence[Pair], method: str = "mean_diff", layers: Sequence[int] | None = None,
                 read: str | int = "answer", progress: Any = None) -> SteeringVector:
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
    texts = [(p.prompt, p.positive) for p in pairs] + [(p.prompt, p.negative) for p in pairs]
    states = read_states(handle, texts, layers, read, progress)
    pos, neg = states[: len(pairs)], states[len(pairs):]
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

WHERE = ("all", "generated")


@dataclass
class Slot:
    vector: SteeringVector
    strength: float
    on: bool = True
    relative: bool = False  # strength × the layer's mean norm × the unit direction
    layers: list[int] | None = None  # a subset of the vector's layers; None for all
    where: str = "all"  # every position, or only the tokens being generated


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

    def add(self, name: str, vector: SteeringVector, strength: float, *, relative: bool = False,
            layers: Sequence[int] | None = None, where: str = "all") -> None:
        if name in self.slots:
            raise KeditError(f"a vector named {name!r} is already in the rack; /steer list shows them")
        if where not in WHERE:
            raise KeditError(f"positions are one of {', '.join(WHERE)}, not {where!r}")
        chosen = None if layers is None else sorted(set(layers))
        if chosen is not None and not set(chosen) <= set(vector.layers):
            raise KeditError(f"the vector has layers {vector.layers}; {chosen} asks for others")
        if relative and not set(chosen or vector.layers) <= set(vector.norms):
            raise KeditError("this vector stores no hidden-state norms for its layers, so a relative "
                             "strength has nothing to scale; give an absolute strength")
        self.slots[name] = Slot(vector, float(strength), True, relative, chosen, where)
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
        return [(name, "on" if s.on else "off", f"{s.strength:g}{' × norm' if s.relative else ''}",
                 _recommended(s.vector), _span(s.layers or s.vector.layers), s.where, s.vector.method)
                for name, s in self.slots.items()]


def _recommended(vector: SteeringVector) -> str:
    """The /steer list cell: the measured strength, a magnitude ('+': no limit found up to it), or '-'."""
    rec = vector.recommended
    return "-" if rec is None else f"±{rec.strength:g}{'+' if rec.capped else ''}"


# -- measuring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepRow:
    strength: float
    margin: float  # mean log P(positive) − log P(negative) on the pairs
    perplexity: float  # on the neutral texts


@contextmanager
def _probing(rack: SteeringRack, name: str) -> Iterator[Callable[[float], None]]:
    """A setter for the racked vector ``name``'s strength (on, at every position); the slot is
    put back as it was on exit, whatever happens."""
    slot = rack._slot(name)
    saved = (slot.strength, slot.on, slot.where)

    def at(strength: float) -> None:
        slot.strength = float(strength)
        rack._rebuild()

    try:
        slot.on, slot.where = True, "all"
        yield at
    finally:
        slot.strength, slot.on, slot.where = saved
        rack._rebuild()


def sweep(handle, rack: SteeringRack, name: str, strengths: Sequence[float], pairs: Sequence[Pair],
          neutral: Sequence[str], progress: Any = None) -> list[SweepRow]:
    """The racked vector ``name`` at each strength (on, at every position; the others as they
    are): the log-prob margin on ``pairs`` and the perplexity of ``neutral``. The slot is
    put back as it was, whatever happens."""
    from kedit.engine.metrics import logprob_margin, perplexity

    if not pairs:
        raise KeditError("the sweep needs contrastive pairs to measure the margin on")
    triples = [(p.prompt, p.positive, p.negative) for p in pairs]
    rows = []
    with _probing(rack, name) as at:
        for strength in strengths:
            at(strength)
            rows.append(SweepRow(float(strength), logprob_margin(handle.model, handle.tokenizer, triples),
                                 perplexity(handle.model, handle.tokenizer, neutral)))
            if progress is not None:
                progress(f"strength {strength:g}", len(rows), len(strengths))
    return rows


# Plain English with no mood in it: what a steering vector should leave alone. Short, so that
# finding the recommended strength takes a few forward passes of a few hundred tokens.
NEUTRAL_TEXT = (
    "The train to the city leaves every morning at eight and takes about forty minutes.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The library is open from nine to five on weekdays and closed on Sundays.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "To make tea, heat the water, add the leaves and wait for three minutes.",
    "The report lists the sales figures for each region in the first quarter.",
    "A week has seven days, and most years have three hundred and sixty-five.",
    "The committee will meet on Tuesday to discuss the new budget.",
)
SEARCH_UP, SEARCH_DOWN, BISECTIONS = 6, 16, 3  # doublings from 1 (to 64), halvings, narrowing steps


def _two_digits(x: float) -> float:
    """``x`` to two significant digits, so that every strength tried reads well."""
    return float(f"{x:.2g}")


@torch.no_grad()
def recommend_strength(handle, vector: SteeringVector, neutral: Sequence[str] = NEUTRAL_TEXT, limit: float = 1.2,
                       source: str = "built-in", progress: Any = None) -> Recommendation:
    """The largest magnitude s whose ``neutral`` perplexity at +s and at −s stays within
    ``limit`` × the unsteered one (steering away from a mood can cost more than towards it).

    A grid doubling or halving from 1 brackets s, then geometric bisection narrows the
    bracket to a factor of about 1.09; every strength tried has two significant digits and
    the one returned was measured both ways. −s is measured only where +s passes. The vector
    is measured alone, in a rack of its own, on the model as it is (callers bypass their own).
    """
    from kedit.engine.metrics import perplexity

    if not limit > 1:
        raise KeditError(f"the perplexity limit is a ratio above 1 (e.g. 1.2), not {limit:g}")
    rack = SteeringRack(handle.model, handle.adapter)
    rack.add("probe", vector, 0.0)
    tried: list[tuple[float, float]] = []
    try:
        with _probing(rack, "probe") as at:
            base = perplexity(handle.model, handle.tokenizer, neutral)  # strength 0 leaves no hook

            def ratio(strength: float) -> float:
                at(strength)
                tried.append((strength, perplexity(handle.model, handle.tokenizer, neutral) / base))
                if progress is not None:
                    progress("finding the recommended strength", len(tried), max(len(tried) + 1, 12))
                return tried[-1][1]

            def within(strength: float) -> bool:
                return ratio(strength) <= limit and ratio(-strength) <= limit

            good, bad = _bracket(within)
            for _ in range(BISECTIONS):
                if not good or bad is None:
                    break
                mid = _two_digits((good * bad) ** 0.5)
                if not good < mid < bad:
                    break
                good, bad = (mid, bad) if within(mid) else (good, mid)
    except ValueError as exc:  # perplexity of texts too short to have a next token
        raise KeditError(f"the neutral text cannot be scored: {exc}") from None
    finally:
        rack.remove("probe")
    measured = dict(tried)
    return Recommendation(good, limit, measured.get(good, 1.0), measured.get(-good, 1.0), tuple(tried),
                          bad is None, source)


def _bracket(within: Callable[[float], bool]) -> tuple[float, float | None]:
    """(largest strength within the limit, smallest beyond it) on a grid of powers of 2 from 1;
    (0, s) if even the smallest tried is beyond it, (s, None) if even the largest is within."""
    strength = 1.0
    if within(strength):
        for _ in range(SEARCH_UP):
            if not within(strength * 2):
                return strength, strength * 2
            strength *= 2
        return strength, None
    for _ in range(SEARCH_DOWN):
        lower = _two_digits(strength / 2)
        if within(lower):
            return lower, strength
        strength = lower
    return 0.0, strength


# -- merging --------------------------------------------------------------------------------

MERGE_MODES = ("linear", "ties", "orthogonal")


def merge_vectors(vectors: Sequence[SteeringVector], weights: Sequence[float] | None = None,
                  mode: str = "linear", density: float = 1.0) -> SteeringVector:
    """One vector from several, layer by layer (a layer missing from a vector counts as zero).

    - ``linear``: Σ wᵢ·vᵢ, exactly what racking them at strengths wᵢ adds.
    - ``ties``: TIES-merging of the wᵢ·vᵢ (trim to ``density``, elect each entry's sign,
      average the entries that agree with it).
    - ``orthogonal``: Gram–Schmidt in the order given; each vector keeps only its part
      orthogonal to the ones before it, so a direction they share is counted once.
    """
    from kedit.engine.merging import gram_schmidt, ties_merge

    if mode not in MERGE_MODES:
        raise KeditError(f"merge mode is one of {', '.join(MERGE_MODES)}, not {mode!r}")
    if len(vectors) < 2:
        raise KeditError("merging takes at least two vectors")
    weights = [1.0] * len(vectors) if weights is None else [float(w) for w in weights]
    if len(weights) != len(vectors):
        raise KeditError(f"{len(weights)} weights for {len(vectors)} vectors")
    if len({v.hidden_size for v in vectors}) > 1:
        raise KeditError(f"these vectors have different hidden sizes {sorted({v.hidden_size for v in vectors})}")
    families = {v.model_type for v in vectors if v.model_type}
    if len(families) > 1:
        raise KeditError(f"these vectors are for different model families: {', '.join(sorted(families))}")
    directions, norms = {}, {}
    for layer in sorted(set().union(*(v.layers for v in vectors))):
        parts = [(w, v.directions[layer].float()) for w, v in zip(weights, vectors) if layer in v.directions]
        if mode == "orthogonal":
            parts = list(zip([w for w, _ in parts], gram_schmidt([d for _, d in parts])))
        if mode == "ties":
            directions[layer] = ties_merge([w * d for w, d in parts], density)
        else:
            total = torch.zeros(vectors[0].hidden_size)
            for w, d in parts:
                total = total + w * d
            directions[layer] = total
        known = [v.norms[layer] for v in vectors if layer in v.norms]
        if known:
            norms[layer] = sum(known) / len(known)
    return SteeringVector(directions, families.pop() if families else "", vectors[0].hidden_size,
                          f"merge:{mode}", norms, 1.0, {"weights": weights, "density": density})


def _span(layers: Sequence[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)) \
        else ",".join(map(str, layers))


def parse_floats(text: str, what: str) -> list[float]:
    """'1,0.5' or '2' -> numbers, with an error naming ``what`` for anything else."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise KeditError(f"{what}: numbers separated by commas, e.g. 1,0.5, not {text!r}") from None


def parse_read(text: str) -> str | int:
    """Training's read position: 'answer', or a token index such as -1."""
    if text == "answer":
        return text
    try:
        return int(text)
    except ValueError:
        raise KeditError(f"--read is 'answer' or a token index such as -1, not {text!r}") from None


def read_texts(path: Path) -> list[str]:
    """One text per non-empty line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KeditError(f"no text file at {path}")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise KeditError(f"{path} has no text")
    return texts


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
