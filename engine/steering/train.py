"""Training a steering vector from contrastive pairs.

Training reads each layer's output at the answer: the mean over a completion's tokens
(``read="answer"``) or one token index (``read=-1`` for the last). Rows are padded on the
right and read by their own lengths, so padding never enters a mean.

- ``mean_diff`` (CAA): the mean of (positive − negative).
- ``pca``: the first principal component of the pairs centred on each pair's midpoint
  (±(positive − negative)/2), signed so positives project above negatives, scaled to the
  mean projection of the differences on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kedit.engine.errors import KeditError
from kedit.engine.metrics import pad_right
from kedit.engine.steering.vector import SteeringVector

METHODS = ("mean_diff", "pca")


@dataclass(frozen=True)
class Pair:
    prompt: str
    positive: str  # completions, with the leading space a continuation needs
    negative: str


@torch.no_grad()
def read_states(
    handle, texts: Sequence[tuple[str, str]], layers: Sequence[int], read: str | int = "answer", progress: Any = None
) -> torch.Tensor:
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
    hooks = [
        adapter.layer(layer).register_forward_hook(
            lambda module, args, output, layer=layer: seen.__setitem__(layer, adapter.residual(output))
        )
        for layer in layers
    ]
    out = []
    try:
        for start in range(0, len(rows), 32):
            batch, mask = pad_right(rows[start : start + 32], pad, device)
            model(input_ids=batch, attention_mask=mask)
            for j, (a, b) in enumerate(spans[start : start + 32]):
                out.append(torch.stack([seen[layer][j, a:b].float().mean(0) for layer in layers]))
            if progress is not None:
                progress("reading hidden states", len(out), len(rows))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(out)


def train_vector(
    handle,
    pairs: Sequence[Pair],
    method: str = "mean_diff",
    layers: Sequence[int] | None = None,
    read: str | int = "answer",
    progress: Any = None,
) -> SteeringVector:
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
    pos, neg = states[: len(pairs)], states[len(pairs) :]
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
    return SteeringVector(
        directions,
        handle.adapter.model_type,
        int(handle.model.config.hidden_size),
        method,
        norms,
        meta={"pairs": len(pairs), "read": read},
    )
