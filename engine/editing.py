"""Applying an edit as a transaction: compute, apply, check, probe; on any failure, undo all.

The transaction knows no method: it asks the one named (kedit.engine.methods.table) for its
settings, its layer and its patch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from kedit.engine.config import Config
from kedit.engine.errors import KeditError
from kedit.engine.ledger import Edit, Ledger
from kedit.engine.methods.base import EditContext, EditRequest, as_continuation
from kedit.engine.methods.table import method_named
from kedit.engine.model import ModelHandle
from kedit.engine.subject import resolve_subject

# Well-known facts for choosing a real model's edit layer by causal tracing.
TRACE_CASES = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("Michael Jordan plays the sport of", "Michael Jordan"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ("Steve Jobs was the founder of", "Steve Jobs"),
    ("The Louvre is located in", "The Louvre"),
]


def trace_cases(config: Config, world: Any | None) -> list[tuple[str, str]]:
    """(prompt, subject) pairs for causal tracing: the fact world's own facts, else kedit.toml's."""
    if world is not None:
        return [(f.prompt(0), f.subject) for f in world.facts[:: max(1, len(world.facts) // 12)]]
    return [(str(p), str(s)) for p, s in config.get("rome.trace_cases", TRACE_CASES)]


def default_method(config: Config) -> str:
    from kedit.engine.methods.table import METHODS

    method = str(config.get("edit.method", "rome"))
    if method not in METHODS:
        raise KeditError(f"kedit.toml sets [edit] method = {method!r}; available: {', '.join(METHODS)}")
    return method


def method_params(handle: ModelHandle, config: Config, method: str, **overrides: Any) -> Any:
    """The method's hyperparameters for the loaded model (kedit.toml), with overrides."""
    cls = method_named(method).params
    return cls.from_config(config, handle.adapter.model_type, handle.model_id).with_(**overrides)


@dataclass
class Editor:
    """What an edit needs from the session: the model and its context, the ledger, the lock,
    the locality prompts, and on the fact world its facts."""

    ctx: EditContext
    ledger: Ledger
    lock: threading.RLock
    locality: Callable[[set[str]], Any]  # subjects to leave out -> LocalitySet
    world: Any | None = None  # the fact world's facts (paraphrases and questions), on that model only


def make_edit(
    editor: Editor,
    prompt: str,
    target: str,
    *,
    subject: str | None = None,
    method: str | None = None,
    layer: int | None = None,
    paraphrases: list[str] | None = None,
    question: str | None = None,
    identity_c: bool = False,
    params: dict[str, Any] | None = None,
    probe: bool = True,
) -> Edit:
    """Apply one edit; the model is bit-identical to before if anything fails.

    ``question`` is the fact asked in chat, for the generation-based probe (default: the
    prompt itself sent as a chat turn; on the fact world, the fact's own question). Without
    ``probe`` (an evaluation that measures on its own) the edit carries no probe.

    ``params`` overrides the method's hyperparameters from kedit.toml for this edit.
    ``info.timings`` gets the seconds spent computing the edit and probing it.
    """
    ctx = editor.ctx
    handle = ctx.handle
    method = method or default_method(ctx.config)
    kind = method_named(method)
    clean, subj, target_text = _checked(handle, prompt, target, subject, paraphrases or [], question)
    if editor.world is not None:
        world = editor.world
        paraphrases = world.paraphrases(subj.text, clean) if paraphrases is None else paraphrases
        question = question or world.question(subj.text, clean)
    request = EditRequest(clean, subj.text, target_text, tuple(paraphrases or ()))
    extra = {"identity_c": True} if identity_c else {}
    try:
        hp = method_params(handle, ctx.config, method, **(params or {})).with_(layer=layer, **extra)
    except TypeError as exc:
        raise KeditError(f"{method} has no such setting: {exc}") from None
    started = time.perf_counter()
    with editor.lock:
        from kedit.engine.probes import GenSettings, generations
        from kedit.engine.probes import probe as probe_edit

        started_loc = time.perf_counter()
        settings = GenSettings.from_config(ctx.config)
        if probe:
            # what the user will compare: the prompt, its paraphrases and the chat answer, unedited
            said_before = generations(handle, clean, list(request.paraphrases), question, settings)
            loc, before, loc_before = _unedited_locality(editor, {subj.text}, settings)
        locality_seconds = time.perf_counter() - started_loc
        edit_id = editor.ledger.next_id()
        computing = time.perf_counter()
        with _computing(method):
            chosen = kind.layer(ctx, hp)
            computed = kind.compute(ctx, request, hp, chosen, edit_id)
        patch, info = computed.patch, computed.info
        timings = info.timings
        timings["compute"] = time.perf_counter() - computing
        timings["locality"] = locality_seconds
        patch.apply()
        result = None
        try:
            _check_finite(handle, clean)
            probing = time.perf_counter()
            if probe:
                result = probe_edit(
                    handle,
                    clean,
                    target_text,
                    list(request.paraphrases),
                    loc,
                    before,
                    subject=subj.text,
                    question=question,
                    settings=settings,
                    loc_before=loc_before,
                )
                if result.by_gen is not None:
                    result.by_gen.before = said_before
            timings["probe"] = time.perf_counter() - probing
        except BaseException:
            patch.revert()
            raise
        edit = Edit(
            edit_id,
            method,
            clean,
            subj.text,
            target_text,
            patch,
            chosen,
            subj.how,
            hp.as_dict() | {"layer": chosen},
            info,
            result,
            list(request.paraphrases),
            seconds=time.perf_counter() - started,
            question=question,
        )
        editor.ledger.add(edit)
        return edit


def _unedited_locality(editor: Editor, subjects: set[str], settings: Any) -> tuple[Any, Any, list[str]]:
    """The locality prompts for an edit of ``subjects``, with the unedited model's teacher-forced
    snapshot and generations on them, for the probe to compare with."""
    from kedit.engine.probes import locality_generations, snapshot

    handle = editor.ctx.handle
    loc = editor.locality(subjects)
    return loc, snapshot(handle, loc), locality_generations(handle, loc, settings)


def _checked(
    handle: ModelHandle, prompt: str, target: str, subject: str | None, paraphrases: list[str], question: str | None
) -> tuple[str, Any, str]:
    """The prompt without brackets, its subject, and the target as a continuation; refused if
    the target is empty or any text is too long (see ``_check_lengths``)."""
    clean, subj = resolve_subject(prompt.strip(), subject)
    if not target.strip():
        raise KeditError("the target is empty: say what the model should answer")
    target_text = as_continuation(clean, target)
    _check_lengths(handle, clean, target_text)
    for text in [*paraphrases, *([question] if question else [])]:
        _check_lengths(handle, text, "")
    return clean, subj, target_text


@contextmanager
def _computing(method: str) -> Iterator[None]:
    """Computing an edit: running out of GPU memory or diverging is an error the user can act on
    (the model is untouched: compute never changes it)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise KeditError(
            "the GPU ran out of memory computing the edit; the model is unchanged. "
            "Try --quant 4bit, fewer context prefixes (n_contexts) or a smaller batch"
        ) from None
    except FloatingPointError as exc:
        raise KeditError(
            f"the edit diverged ({exc}); the model is unchanged. "
            f"Try a lower {method}.{method_named(method).lr_setting} or another layer"
        ) from None


MAX_BATCH = 10_000  # facts in one batch edit


def make_batch_edit(
    editor: Editor,
    cases: list[Any],
    *,
    method: str | None = None,
    layer: int | None = None,
    params: dict[str, Any] | None = None,
    probe: bool = True,
) -> Edit:
    """Apply a batch of facts as one edit with a batch method (MEMIT, AlphaEdit): one ledger
    entry, one patch, a transaction like ``make_edit``. ``cases`` are
    kedit.engine.evaluate.EvalCase records (prompt, target, subject, rephrase, question).
    Without ``probe`` (an evaluation that measures on its own) the edit carries no probe."""
    ctx = editor.ctx
    handle = ctx.handle
    method = method or default_method(ctx.config)
    kind = method_named(method)
    if not kind.batches:
        from kedit.engine.methods.table import METHODS

        able = ", ".join(n for n, m in METHODS.items() if m.batches)
        raise KeditError(f"{method} edits one fact at a time; a file of facts needs a batch method ({able})")
    if not cases:
        raise KeditError("the batch holds no facts")
    if len(cases) > MAX_BATCH:
        raise KeditError(f"the batch holds {len(cases)} facts; split it into batches of at most {MAX_BATCH}")
    requests: list[EditRequest] = []
    facts: list[dict[str, Any]] = []
    for i, case in enumerate(cases):
        try:
            clean, subj, target_text = _checked(
                handle, case.prompt, case.target, case.subject, case.rephrase, case.question
            )
        except KeditError as exc:
            raise KeditError(f"fact {i + 1} ({case.prompt!r}): {exc.message}") from None
        requests.append(EditRequest(clean, subj.text, target_text, tuple(case.rephrase)))
        facts.append(
            {
                "prompt": clean,
                "subject": subj.text,
                "target": target_text,
                "paraphrases": list(case.rephrase),
                "question": case.question,
            }
        )
    try:
        hp = method_params(handle, ctx.config, method, **(params or {})).with_(layer=layer)
    except TypeError as exc:
        raise KeditError(f"{method} has no such setting: {exc}") from None
    started = time.perf_counter()
    with editor.lock:
        from kedit.engine.probes import GenSettings, probe_batch

        settings = GenSettings.from_config(ctx.config)
        started_loc = time.perf_counter()
        if probe:
            loc, before, loc_before = _unedited_locality(editor, {r.subject for r in requests}, settings)
        locality_seconds = time.perf_counter() - started_loc
        edit_id = editor.ledger.next_id()
        computing = time.perf_counter()
        with _computing(method):
            chosen = kind.layer(ctx, hp)
            computed = kind.compute_batch(ctx, requests, hp, chosen, edit_id)
        patch, info = computed.patch, computed.info
        info.timings["compute"] = time.perf_counter() - computing
        info.timings["locality"] = locality_seconds
        patch.apply()
        result = None
        try:
            _check_finite(handle, requests[0].prompt)
            probing = time.perf_counter()
            if probe:
                if ctx.progress:
                    ctx.progress("probing the batch", 0, 1)
                result = probe_batch(handle, facts, loc, before, settings, loc_before)
            info.timings["probe"] = time.perf_counter() - probing
        except BaseException:
            patch.revert()
            raise
        first = requests[0]
        edit = Edit(
            edit_id,
            method,
            first.prompt,
            first.subject,
            first.target,
            patch,
            chosen,
            "batch",
            hp.as_dict() | {"layer": chosen},
            info,
            result,
            [],
            seconds=time.perf_counter() - started,
            facts=facts,
        )
        editor.ledger.add(edit)
        return edit


MAX_PROMPT_TOKENS = 128  # an edit's prompt is one sentence about the subject
MAX_TARGET_TOKENS = 32  # and its target a short answer: each token is a step of the value's loss


def _check_lengths(handle: ModelHandle, prompt: str, target: str) -> None:
    """Refuse a prompt (or a paraphrase or question) or target too long to be a fact, or for
    the model's context."""
    tok = handle.tokenizer
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    n_target = len(tok(target, add_special_tokens=False)["input_ids"])
    context = int(getattr(handle.model.config, "max_position_embeddings", 0) or 1 << 30)
    if n_prompt > MAX_PROMPT_TOKENS:
        raise KeditError(
            f"the prompt is {n_prompt} tokens; an edit's prompt is one sentence (at most {MAX_PROMPT_TOKENS})"
        )
    if n_target > MAX_TARGET_TOKENS:
        raise KeditError(
            f"the target is {n_target} tokens; an edit's target is a short answer (at most {MAX_TARGET_TOKENS})"
        )
    if n_prompt + n_target > context - 16:  # room for a context prefix before the prompt
        raise KeditError(
            f"the prompt and target are {n_prompt + n_target} tokens, too long for this model's "
            f"{context}-position context with a context prefix before them"
        )


@torch.no_grad()
def _check_finite(handle: ModelHandle, prompt: str) -> None:
    ids = handle.tokenizer(prompt, return_tensors="pt")["input_ids"].to(next(handle.model.parameters()).device)
    if not torch.isfinite(handle.model(ids).logits).all():
        raise KeditError("the edited model produces NaN or infinite logits; the edit was undone")
