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

METHODS = ("rome", "grace", "wise")
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
    return method_params(session, "rome", **overrides)


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


def default_method(session: Session) -> str:
    method = str(session.config.get("edit.method", "rome"))
    if method not in METHODS:
        raise KeditError(f"kedit.toml sets [edit] method = {method!r}; available: {', '.join(METHODS)}")
    return method


def method_params(session: Session, method: str, **overrides: Any) -> Any:
    """The method's hyperparameters for the loaded model (kedit.toml), with overrides."""
    from kedit.engine.methods.grace import GraceParams
    from kedit.engine.methods.wise import WiseParams

    cls = {"rome": RomeParams, "grace": GraceParams, "wise": WiseParams}[method]
    h = session.handle
    return cls.from_config(session.config, h.adapter.model_type, h.model_id).with_(**overrides)


def share_layer(session: Session, hp: Any) -> int:
    """GRACE's and WISE's layer: the configured one, else layer_share of the way up."""
    n = session.handle.adapter.n_layers
    layer = hp.layer if hp.layer is not None else round(hp.layer_share * (n - 1))
    if not 0 <= layer < n:
        raise KeditError(f"layer {layer} is out of range: the model has {n} layers (0-{n - 1})")
    return layer


def method_layer(session: Session, method: str, hp: Any) -> int:
    """The layer ``method`` edits with settings ``hp``."""
    return edit_layer(session, hp) if method == "rome" else share_layer(session, hp)


def _compute(session: Session, method: str, request: EditRequest, hp: Any, edit_id: str,
             stats_corpus: Path | None, progress: Progress | None) -> tuple[Any, int, dict]:
    """(patch, layer, info) of one edit, computed with the model left as it is."""
    chosen = method_layer(session, method, hp)
    if method == "rome":
        from kedit.engine.methods.rome.method import apply_rome

        outcome = apply_rome(session.handle, request, hp, chosen,
                             session.contexts(hp.n_contexts, hp.context_tokens), edit_id, stats_corpus, progress)
        return outcome.patch, chosen, outcome.info
    if method == "grace":
        from kedit.engine.methods.grace import apply_grace

        patch, info = apply_grace(session.handle, request, hp, chosen, edit_id, progress)
    else:
        from kedit.engine.methods.wise import apply_wise

        irrelevant = [t for t in session.contexts(hp.n_irrelevant, hp.irrelevant_tokens) if t]
        patch, info = apply_wise(session.handle, request, hp, chosen, edit_id, irrelevant, progress)
    return patch, chosen, info


def make_edit(session: Session, prompt: str, target: str, *, subject: str | None = None,
              method: str | None = None, layer: int | None = None, paraphrases: list[str] | None = None,
              question: str | None = None, stats_corpus: Path | None = None, identity_c: bool = False,
              params: dict[str, Any] | None = None, progress: Progress | None = None) -> Edit:
    """Apply one edit; the model is bit-identical to before if anything fails.

    ``question`` is the fact asked in chat, for the generation-based probe (default: the
    prompt itself sent as a chat turn; on the fact world, the fact's own question).

    ``params`` overrides the method's hyperparameters from kedit.toml for this edit.
    ``info["timings"]`` gets the seconds spent computing the edit and probing it.
    """
    method = method or default_method(session)
    if method not in METHODS:
        raise KeditError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    clean, subj = resolve_subject(prompt.strip(), subject)
    if not target.strip():
        raise KeditError("the target is empty: say what the model should answer")
    target_text = as_continuation(clean, target)
    if session.handle.source.kind == "fact-world":
        world = session.fact_world()
        paraphrases = world.paraphrases(subj.text, clean) if paraphrases is None else paraphrases
        question = question or world.question(subj.text, clean)
    request = EditRequest(clean, subj.text, target_text, tuple(paraphrases or ()))
    extra = {"identity_c": identity_c or None} if method == "rome" else {}
    try:
        hp = method_params(session, method, **(params or {})).with_(layer=layer, **extra)
    except TypeError as exc:
        raise KeditError(f"{method} has no such setting: {exc}") from None
    started = time.perf_counter()
    with session.lock:
        from kedit.engine.probes import GenSettings, locality_generations, probe, snapshot

        started_loc = time.perf_counter()
        settings = GenSettings.from_config(session.config)
        loc = session.locality(exclude={subj.text})
        before = snapshot(session.handle, loc)
        loc_before = locality_generations(session.handle, loc, settings)
        locality_seconds = time.perf_counter() - started_loc
        edit_id = session.ledger.next_id()
        try:
            computing = time.perf_counter()
            patch, chosen, info = _compute(session, method, request, hp, edit_id, stats_corpus, progress)
            timings = info.setdefault("timings", {})
            timings["compute"] = time.perf_counter() - computing
            timings["locality"] = locality_seconds
        except torch.cuda.OutOfMemoryError:
            raise KeditError("the GPU ran out of memory computing the edit; the model is unchanged. "
                             "Try --quant 4bit or fewer ROME contexts (rome.n_contexts)") from None
        except FloatingPointError as exc:
            raise KeditError(f"the edit diverged ({exc}); the model is unchanged. "
                             f"Try a lower {method}.{'v_lr' if method == 'rome' else 'lr'} or another layer") from None
        patch.apply()
        try:
            _check_finite(session, clean)
            probing = time.perf_counter()
            result = probe(session.handle, clean, target_text, list(request.paraphrases), loc, before,
                           subject=subj.text, question=question, settings=settings, loc_before=loc_before)
            timings["probe"] = time.perf_counter() - probing
        except BaseException:
            patch.revert()
            raise
        edit = Edit(edit_id, method, clean, subj.text, target_text, patch, chosen, subj.how,
                    hp.as_dict() | {"layer": chosen}, info, result, list(request.paraphrases),
                    seconds=time.perf_counter() - started, question=question)
        session.ledger.add(edit)
        return edit


def method_state(model: torch.nn.Module) -> list[str]:
    """One line per GRACE codebook and WISE side memory on the model."""
    from kedit.engine.methods.grace import codebooks
    from kedit.engine.methods.wise import memories

    def fmt(v: Any) -> str:
        return "—" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = []
    for book in codebooks(model).values():
        if book.entries:
            st = book.state()
            lines.append(f"GRACE on {st['module']}: {st['entries']} codebook entries, radius min "
                         f"{fmt(st['radius min'])} / median {fmt(st['radius median'])} / max "
                         f"{fmt(st['radius max'])}; {st['positions replaced']} positions answered from it")
    for mem in memories(model).values():
        if mem.scores:
            st = mem.state()
            thresholds = ", ".join(fmt(t) for t in st["thresholds"])
            lines.append(f"WISE on {st['module']}: {st['side memories']} side memor"
                         f"{'y' if st['side memories'] == 1 else 'ies'}, edits per shard {st['edits per shard']}, "
                         f"routing thresholds {thresholds}; share of positions routed to a side memory "
                         f"{fmt(st['routed share'])}")
    return lines


@torch.no_grad()
def _check_finite(session: Session, prompt: str) -> None:
    tok = session.tokenizer
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(next(session.model.parameters()).device)
    if not torch.isfinite(session.model(ids).logits).all():
        raise KeditError("the edited model produces NaN or infinite logits; the edit was undone")
