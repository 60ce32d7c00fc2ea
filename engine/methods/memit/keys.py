"""Each fact's key at a layer (the MLP output projection's input at the subject's last token,
averaged over context prefixes, as MEMIT's ``compute_ks``), and the residual stream at the top
layer on the bare prompt. Passes stop at the layer they read: the blocks above cannot change it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from kedit.engine.methods.base import EditRequest
from kedit.engine.metrics import pad_right
from kedit.engine.subject import subject_last_token

ROWS_PER_PASS = 64


class _Reached(Exception):
    """Raised once the pass has what it came for."""


@contextmanager
def _stop_after(module: torch.nn.Module, grab) -> Iterator[dict[str, torch.Tensor]]:
    """While open, a forward pass hands ``grab(args, output)`` of ``module`` back and ends there."""
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, args, output):
        seen["value"] = grab(args, output)
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def _at_subjects(handle, module, grab, texts: Sequence[str], subjects: Sequence[str]) -> torch.Tensor:
    """``grab`` of ``module`` at each text's subject's last token, (len(texts), width), float32."""
    tok, model = handle.tokenizer, handle.model
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for start in range(0, len(texts), ROWS_PER_PASS):
        chunk = list(texts[start : start + ROWS_PER_PASS])
        subj = subjects[start : start + ROWS_PER_PASS]
        ids, mask = pad_right([tok(t)["input_ids"] for t in chunk], pad, device)
        pos = torch.tensor([subject_last_token(tok, t, s) for t, s in zip(chunk, subj)], device=device)
        with _stop_after(module, grab) as seen:
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Reached:
                pass
        out.append(seen["value"][torch.arange(len(chunk), device=device), pos].float())
    return torch.cat(out)


def fact_keys(handle, layer: int, requests: Sequence[EditRequest], templates: Sequence[Sequence[str]]) -> torch.Tensor:
    """(len(requests), d_in): each fact's key at ``layer``, the mean over its context templates
    (``templates[i]``, "{}" for the prompt; every fact has as many)."""
    module = handle.adapter.mlp_out(layer)
    texts = [c.format(r.prompt) for r, cs in zip(requests, templates) for c in cs]
    subjects = [r.subject for r, cs in zip(requests, templates) for _ in cs]
    keys = _at_subjects(handle, module, lambda args, output: args[0], texts, subjects)
    return keys.view(len(requests), len(templates[0]), -1).mean(1)


def residuals(handle, layer: int, requests: Sequence[EditRequest]) -> torch.Tensor:
    """(len(requests), d): the residual stream after block ``layer`` at each bare prompt's subject."""
    adapter = handle.adapter
    return _at_subjects(
        handle,
        adapter.layer(layer),
        lambda args, output: adapter.residual(output),
        [r.prompt for r in requests],
        [r.subject for r in requests],
    )
