"""Applying an edit as a transaction: compute, apply, check, probe; on any failure, undo all."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kedit.engine.errors import KeditError
from kedit.engine.ledger import Edit
from kedit.engine.methods import EditRequest, as_continuation
from kedit.engine.methods.rome.hparams import RomeParams
from kedit.engine.subject import resolve_subject

if TYPE_CHECKING:
    from kedit.engine.session import Session

METHODS = ("rome",)
Progress = Callable[[str, int, int], None]

# Well-known facts for choosing a real model's edit layer by causal tracing.
TRACE_CASES = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("Michael Jordan plays the sport of", "Michael Jordan"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ("Steve Jobs was the founder of", "Steve Jobs"),
    ("The Louvre is located in", "The Louvre"),
]


def trace_cases(session: Session) -> list[tuple[str, str]]:
    if session.handle.source.kind == "fact-world":
        world = session.fact_world()
        return [(f.prompt(0), f.subject) for f in world.facts[:: max(1, len(world.facts) // 12)]]
    return [tuple(c) for c in session.config.get("rome.trace_cases", TRACE_CASES)]


def rome_params(session: Session, **overrides: Any) -> RomeParams:
    h = session.handle
    return RomeParams.from_config(session.config, h.adapter.model_type,
                                  h.source.location or h.source.name).with_(**overrides)


def edit_layer(session: Session, hp: RomeParams) -> int:
    """The configured layer, else the causal-tracing choice, cached per model."""
    from kedit.engine.trace import best_edit_layer, cached_edit_layer

    if hp.layer is not None:
        if not 0 <= hp.layer < session.handle.adapter.n_layers:
            raise KeditError(f"layer {hp.layer} is out of range: the model has "
                             f"{session.handle.adapter.n_layers} layers (0-{session.handle.adapter.n_layers - 1})")
        return hp.layer
    h = session.handle

    def trace() -> int:
        return best_edit_layer(h.model, h.tokenizer, h.adapter, trace_cases(session))[0]

    return cached_edit_layer(h, "rome", trace)


def make_edit(session: Session, prompt: str, target: str, *, subject: str | None = None,
              method: str = "rome", layer: int | None = None, paraphrases: list[str] | None = None,
              stats_corpus: Path | None = None, identity_c: bool = False,
              progress: Progress | None = None) -> Edit:
    """Apply one edit; the model is bit-identical to before if anything fails."""
    if method not in METHODS:
        raise KeditError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    clean, subj = resolve_subject(prompt.strip(), subject)
    if not target.strip():
        raise KeditError("the target is empty: say what the model should answer")
    target_text = as_continuation(clean, target)
    if paraphrases is None and session.handle.source.kind == "fact-world":
        paraphrases = session.fact_world().paraphrases(subj.text, clean)
    request = EditRequest(clean, subj.text, target_text, tuple(paraphrases or ()))
    hp = rome_params(session, layer=layer, identity_c=identity_c or None)
    started = time.perf_counter()
    with session.lock:
        chosen = edit_layer(session, hp)
        loc = session.locality(exclude={subj.text})
        from kedit.engine.probes import probe, snapshot

        before = snapshot(session.handle, loc)
        edit_id = session.ledger.next_id()
        try:
            from kedit.engine.methods.rome.method import apply_rome

            outcome = apply_rome(session.handle, request, hp, chosen,
                                 session.contexts(hp.n_contexts, hp.context_tokens), edit_id,
                                 stats_corpus, progress)
        except torch.cuda.OutOfMemoryError:
            raise KeditError("the GPU ran out of memory computing the edit; the model is unchanged. "
                             "Try --quant 4bit or fewer ROME contexts (rome.n_contexts)") from None
        except FloatingPointError as exc:
            raise KeditError(f"the edit diverged ({exc}); the model is unchanged. "
                             "Try a lower rome.v_lr or another layer") from None
        patch = outcome.patch
        patch.apply()
        try:
            _check_finite(session, clean)
            result = probe(session.handle, clean, target_text, list(request.paraphrases), loc, before)
        except BaseException:
            patch.revert()
            raise
        edit = Edit(edit_id, method, clean, subj.text, target_text, patch, chosen, subj.how,
                    hp.as_dict() | {"layer": chosen}, outcome.info, result, list(request.paraphrases),
                    seconds=time.perf_counter() - started)
        session.ledger.add(edit)
        return edit


@torch.no_grad()
def _check_finite(session: Session, prompt: str) -> None:
    tok = session.tokenizer
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(next(session.model.parameters()).device)
    if not torch.isfinite(session.model(ids).logits).all():
        raise KeditError("the edited model produces NaN or infinite logits; the edit was undone")
