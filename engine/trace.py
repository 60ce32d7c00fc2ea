"""Causal tracing (Meng et al. 2022, section 2.1): which layer's MLP at the subject recalls the fact.

Corrupt the subject's token embeddings with Gaussian noise, then restore one layer's MLP
output at the subject's last token to its clean value and see how much of the answer's
probability comes back. That gain, averaged over noise draws, is the layer's indirect effect;
the layer with the largest one is where ROME-style methods edit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kedit.engine.arch import ArchAdapter
from kedit.engine.paths import atomic_path, cache_dir
from kedit.engine.subject import subject_token_span

_EIGHTHS = " ▏▎▍▌▋▊▉█"


@dataclass
class TraceResult:
    """Outcome of tracing one prompt: clean and corrupted answer probability and per-layer effects."""

    prompt: str
    subject: str
    answer: str
    answer_id: int
    p_clean: float
    p_corrupt: float
    effects: list[float]  # per layer: mean P(answer | corrupted, layer restored) - p_corrupt

    @property
    def best_layer(self) -> int:
        """The layer whose restoration brings back the most probability."""
        return max(range(len(self.effects)), key=lambda i: self.effects[i])

    def chart(self, width: int = 40) -> str:
        """One text bar per layer, scaled to the largest effect, with the best layer marked."""
        top = max(max(self.effects, default=0.0), 1e-12)
        digits = len(str(max(len(self.effects) - 1, 0)))
        lines = []
        for i, effect in enumerate(self.effects):
            eighths = round(max(effect, 0.0) / top * width * 8)
            bar = "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")
            mark = "  ◀ best" if i == self.best_layer else ""
            lines.append(f"L{i:>{digits}} │{bar:<{width}} {effect:6.3f}{mark}")
        return "\n".join(lines)


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The `window` layers centred on `layer` (ROME's convention for even windows), clipped to the model."""
    start = layer - window // 2
    return [i for i in range(start, start + window) if 0 <= i < n_layers]


def default_window(n_layers: int) -> int:
    """1 for small models (every layer resolves on its own); 10 for deep ones, as in the paper's MLP traces."""
    return 1 if n_layers <= 12 else 10


@contextmanager
def _hooks(pairs: list[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Register forward hooks for the duration of a block and always remove them."""
    handles = []
    try:
        for module, hook in pairs:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _noise_hook(span: tuple[int, int], noise: torch.Tensor) -> Callable[..., Any]:
    """Forward hook adding `noise` (samples, span, hidden) to the embedding output over the span."""
    start, end = span

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        out[:, start:end] += noise.to(out.dtype)
        return out

    return hook


def _restore_hook(position: int, clean: torch.Tensor) -> Callable[..., Any]:
    """Forward hook setting the output at `position` to its clean value (hidden,) in every batch row."""

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        out[:, position] = clean.to(out.dtype)
        return out

    return hook


def _record_hook(store: dict[int, torch.Tensor], layer: int) -> Callable[..., None]:
    """Forward hook keeping a copy of a module's output under its layer index."""

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        store[layer] = output.detach().clone()

    return hook


def _answer_prob(model: nn.Module, ids: torch.Tensor, answer_id: int) -> torch.Tensor:
    """P(answer) at the last position for each row of `ids` (no padding: all rows are full)."""
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float()
    return logits.softmax(-1)[:, answer_id]


def _embedding_std(adapter: ArchAdapter) -> float:
    """Standard deviation of the embedding output's entries (weight std times any self-applied scale)."""
    weight = adapter.embed().weight
    return float(weight.detach().float().std()) * adapter.embed_weight_scale()


def causal_trace(model: nn.Module, tokenizer: Any, adapter: ArchAdapter, prompt: str, subject: str, *,
                 target: str | None = None, samples: int = 10, noise: float = 3.0,
                 window: int | None = None, seed: int = 0) -> TraceResult:
    """Trace the MLP indirect effect of every layer at the subject's last token for one prompt."""
    if samples < 1:
        raise ValueError("samples must be at least 1")
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    span = subject_token_span(tokenizer, prompt, subject)
    last = span[1] - 1
    n = adapter.n_layers
    window = default_window(n) if window is None else window
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clean: dict[int, torch.Tensor] = {}
            with _hooks([(adapter.mlp_out(i), _record_hook(clean, i)) for i in range(n)]):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
            if target is not None:
                target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
                if not target_ids:
                    raise ValueError(f"the target {target!r} has no tokens")
                answer_id = int(target_ids[0])
            else:
                answer_id = int(logits.argmax())
            p_clean = float(logits.softmax(-1)[answer_id])

            gen = torch.Generator().manual_seed(seed)
            draws = torch.randn((samples, span[1] - span[0], adapter.hidden_size), generator=gen)
            noise_hook = (adapter.embed(), _noise_hook(span, (draws * noise * _embedding_std(adapter)).to(device)))
            batch = ids.expand(samples, -1)
            with _hooks([noise_hook]):
                p_corrupt = float(_answer_prob(model, batch, answer_id).mean())
            effects = []
            for layer in range(n):
                restores = [(adapter.mlp_out(i), _restore_hook(last, clean[i][0, last]))
                            for i in window_layers(layer, window, n)]
                with _hooks([noise_hook, *restores]):
                    effects.append(float(_answer_prob(model, batch, answer_id).mean()) - p_corrupt)
    finally:
        model.train(was_training)
    return TraceResult(prompt=prompt, subject=subject, answer=tokenizer.decode([answer_id]),
                       answer_id=answer_id, p_clean=p_clean, p_corrupt=p_corrupt, effects=effects)


def best_edit_layer(model: nn.Module, tokenizer: Any, adapter: ArchAdapter, cases: list[tuple[str, str]],
                    **kw: Any) -> tuple[int, list[float]]:
    """Average the traced effects over (prompt, subject) cases; return the best layer and the means."""
    if not cases:
        raise ValueError("best_edit_layer needs at least one (prompt, subject) case")
    total = [0.0] * adapter.n_layers
    for prompt, subject in cases:
        result = causal_trace(model, tokenizer, adapter, prompt, subject, **kw)
        total = [t + e for t, e in zip(total, result.effects, strict=True)]
    means = [t / len(cases) for t in total]
    return max(range(len(means)), key=lambda i: means[i]), means


def cached_edit_layer(handle: Any, method: str, compute: Callable[[], int]) -> int:
    """The layer chosen for `method` on this model, computed once and kept in cache_dir()/layers.json."""
    path = cache_dir() / "layers.json"
    key = handle.cache_key
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    entry = table.get(key)
    if isinstance(entry, dict) and isinstance(entry.get(method), int):
        return entry[method]
    layer = int(compute())
    if not isinstance(entry, dict):
        entry = table[key] = {}
    entry[method] = layer
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=2, sort_keys=True)
    return layer
