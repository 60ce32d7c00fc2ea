"""Causal tracing (Meng et al. 2022, section 2.1): which layer's MLP at the subject recalls the fact.

Corrupt the subject's token embeddings with Gaussian noise, then restore one layer's MLP
output at the subject's last token to its clean value and see how much of the answer's
probability comes back. That gain, averaged over noise draws, is the layer's indirect effect;
the layer with the largest one is where ROME-style methods edit.

Three things keep it cheap without changing what it measures. Positions before the subject's
last token are the same in every corrupted pass, so they run once and later passes continue
their cache. A restored pass differs from the corrupted one only from the first restored layer
up, so the blocks below it hand back the corrupted pass's outputs instead of running. Only the
last position goes through the output head. On SmolLM2-135M (30 layers, 10-layer windows, the
five default cases) that is about a third of the work of running every pass whole.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

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


def _noise_hook(start: int, noise: torch.Tensor) -> Callable[..., Any]:
    """Forward hook adding `noise` (samples, positions, hidden) to the embedding output from `start` on."""

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        out[:, start : start + noise.shape[1]] += noise.to(out.dtype)
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


def _answer_prob(model: nn.Module, ids: torch.Tensor, answer_id: int, past: Any = None) -> torch.Tensor:
    """P(answer) at the last position for each row of `ids` (no padding: all rows are full),
    continuing `past` (a cache of the positions before `ids`, left as it was) when given.

    Only the last position goes through the output head (``logits_to_keep``): the others are not read.
    """
    extra: dict[str, Any] = {"use_cache": False}
    before = 0
    if past is not None:
        before = past.get_seq_length()
        extra = {"use_cache": True, _cache_kwarg(model): copy.deepcopy(past)}  # the pass appends to its copy
    mask = torch.ones((ids.shape[0], before + ids.shape[1]), dtype=torch.long, device=ids.device)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, **extra).logits[:, -1].float()
    return logits.softmax(-1)[:, answer_id]


def _corrupted_prefix(model: nn.Module, ids: torch.Tensor, embed: nn.Module, noise_hook: Any) -> Any:
    """The cache of a corrupted pass over `ids` (None when there are no positions)."""
    if ids.shape[1] == 0:
        return None
    with _hooks([(embed, noise_hook)]):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    return next((out[name] for name in ("cache", "past_key_values") if name in out), None)


def _cache_kwarg(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by (transformers renamed it to ``cache``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Recorded(nn.Module):
    """Stands in for a decoder block below a restored window: hands back the block's output from
    the corrupted pass, which it would compute again bit for bit (same input, nothing restored yet)."""

    def __init__(self, block: nn.Module, output: Any) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)  # not a submodule: no second set of parameters
        self.output = output
        if hasattr(block, "attention_type"):  # the model's loop picks each block's mask by it
            self.attention_type = block.attention_type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@contextmanager
def _recording(adapter: ArchAdapter) -> Iterator[dict[int, Any]]:
    """While open, every decoder block's output is kept under its index (as the block returned it)."""

    def keep(store: dict[int, Any], i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store[i] = output

        return hook

    outputs: dict[int, Any] = {}
    with _hooks([(adapter.layer(i), keep(outputs, i)) for i in range(adapter.n_layers)]):
        yield outputs


@contextmanager
def _replaying(adapter: ArchAdapter, outputs: dict[int, Any], start: int) -> Iterator[None]:
    """While open, blocks below ``start`` return their recorded outputs instead of running."""
    blocks = adapter.layers()
    originals = [blocks[i] for i in range(start)]
    try:
        for i, block in enumerate(originals):
            blocks[i] = _Recorded(block, outputs[i])
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def _embedding_std(adapter: ArchAdapter) -> float:
    """Standard deviation of the embedding output's entries (weight std times any self-applied scale)."""
    weight = cast(torch.Tensor, adapter.embed().weight)
    return float(weight.detach().float().std()) * adapter.embed_weight_scale()


def causal_trace(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchAdapter,
    prompt: str,
    subject: str,
    *,
    target: str | None = None,
    samples: int = 10,
    noise: float = 3.0,
    window: int | None = None,
    seed: int = 0,
) -> TraceResult:
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
            draws = (draws * noise * _embedding_std(adapter)).to(device)
            batch = ids.expand(samples, -1)
            # Positions before the subject's last token come out of every corrupted pass the same
            # (restoring acts at `last`, attention looks back only): run them once, keep their cache.
            past = _corrupted_prefix(model, batch[:, :last], adapter.embed(), _noise_hook(span[0], draws[:, :-1]))
            tail = batch[:, last:] if past is not None else batch
            head = last if past is not None else 0
            noise_hook = (
                adapter.embed(),
                _noise_hook(span[0] - head if past is None else 0, draws if past is None else draws[:, -1:]),
            )
            with _hooks([noise_hook]), _recording(adapter) as corrupted:
                p_corrupt = float(_answer_prob(model, tail, answer_id, past).mean())
            effects = []
            for layer in range(n):
                # Below the window the pass is the corrupted one: replay it rather than run it again.
                restored = window_layers(layer, window, n)
                restores = [(adapter.mlp_out(i), _restore_hook(last - head, clean[i][0, last])) for i in restored]
                with _hooks([noise_hook, *restores]), _replaying(adapter, corrupted, restored[0]):
                    effects.append(float(_answer_prob(model, tail, answer_id, past).mean()) - p_corrupt)
    finally:
        model.train(was_training)
    return TraceResult(
        prompt=prompt,
        subject=subject,
        answer=tokenizer.decode([answer_id]),
        answer_id=answer_id,
        p_clean=p_clean,
        p_corrupt=p_corrupt,
        effects=effects,
    )


def best_edit_layer(
    model: nn.Module, tokenizer: Any, adapter: ArchAdapter, cases: list[tuple[str, str]], **kw: Any
) -> tuple[int, list[float]]:
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
