"""Each fact's key at a layer (the MLP output projection's input at the subject's last token,
averaged over context prefixes, as MEMIT's ``compute_ks``), and the residual stream at the top
layer on the bare prompt. Passes stop at the layer they read: the blocks above cannot change it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kedit.engine.methods.base import EditRequest
from kedit.engine.methods.hooks import run_until
from kedit.engine.metrics import pad_right
from kedit.engine.subject import subject_last_token

ROWS_PER_PASS = 64


@torch.no_grad()
def _at_subjects(handle, module, grab, texts: Sequence[str], subjects: Sequence[str]) -> torch.Tensor:
    """``grab`` of ``module``'s input and output (kedit.engine.methods.hooks.run_until) at each
    text's subject's last token, (len(texts), width), float32."""
    tok, model = handle.tokenizer, handle.model
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for start in range(0, len(texts), ROWS_PER_PASS):
        chunk = list(texts[start : start + ROWS_PER_PASS])
        subj = subjects[start : start + ROWS_PER_PASS]
        ids, mask = pad_right([tok(t)["input_ids"] for t in chunk], pad, device)
        pos = torch.tensor([subject_last_token(tok, t, s) for t, s in zip(chunk, subj)], device=device)
        seen = run_until(model, module, input_ids=ids, attention_mask=mask)
        out.append(grab(seen)[torch.arange(len(chunk), device=device), pos].float())
    return torch.cat(out)


def fact_keys(handle, layer: int, requests: Sequence[EditRequest], templates: Sequence[Sequence[str]]) -> torch.Tensor:
    """(len(requests), d_in): each fact's key at ``layer``, the mean over its context templates
    (``templates[i]``, "{}" for the prompt; every fact has as many)."""
    module = handle.adapter.mlp_out(layer)
    texts = [c.format(r.prompt) for r, cs in zip(requests, templates) for c in cs]
    subjects = [r.subject for r, cs in zip(requests, templates) for _ in cs]
    keys = _at_subjects(handle, module, lambda seen: seen["input"], texts, subjects)
    return keys.view(len(requests), len(templates[0]), -1).mean(1)


def residuals(handle, layer: int, requests: Sequence[EditRequest]) -> torch.Tensor:
    """(len(requests), d): the residual stream after block ``layer`` at each bare prompt's subject."""
    adapter = handle.adapter
    return _at_subjects(
        handle,
        adapter.layer(layer),
        lambda seen: adapter.residual(seen["output"]),
        [r.prompt for r in requests],
        [r.subject for r in requests],
    )
