"""Slash commands for knowledge edits: /edit, /edits, /undo, /rollback, /probe, /trace, /save, /load."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kedit.engine import events as ev
from kedit.engine.background import with_progress
from kedit.engine.checks import input_file, output_path
from kedit.engine.commands import REGISTRY, Param
from kedit.engine.errors import KeditError
from kedit.engine.ledger import Edit
from kedit.engine.methods.table import METHODS, method_named, method_state

if TYPE_CHECKING:
    from kedit.engine.session import Session


def _edit_ids(session: Session | None, prefix: str) -> list[str]:
    return [e.id for e in session.edits] if session is not None else []


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _clip(text: str, width: int = 60) -> str:
    """Generated text on one line, cut to ``width`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def probe_table(edit: Edit) -> ev.Table:
    """The compact table shown after an edit: what the edit moved and what it left alone, by
    generation first (what a user sees), then teacher-forced (EasyEdit's definitions)."""
    p = edit.probe
    g = p.by_gen if p else None
    rows: list[tuple[str, ...]] = []
    if p is not None and g is not None:

        def was(key: str) -> None:  # the unedited model's text under the edited one's
            if key in g.before:
                rows.append(("  before the edit", f"⇒ {_clip(g.before[key])}", ""))

        rows.append(("gen: rewrite (Rel)", f"{edit.prompt} ⇒{_clip(g.outputs.get(edit.prompt, ''))}", _fmt(g.rel)))
        was(edit.prompt)
        for para in edit.paraphrases:
            rows.append(("gen: paraphrase", f"{para} ⇒{_clip(g.outputs.get(para, ''))}", _fmt(g.para)))
            was(para)
        for ask, answer in g.outputs.items():
            if ask.startswith("chat: "):
                rows.append(("gen: chat (+subject)", f"{ask.removeprefix('chat: ')} ⇒ {_clip(answer)}", _fmt(g.chat)))
                was(ask)
        rows.append(
            ("gen: locality (Loc)", f"{len(p.rows)} unrelated prompts still generate their answer", _fmt(g.loc))
        )
    rows.append(("tf: rewrite (Rel)", edit.prompt + " →" + edit.target, _fmt(p.rel if p else None)))
    for para in edit.paraphrases:
        rows.append(("tf: paraphrase (Gen)", para + " →" + edit.target, _fmt(p.gen if p else None)))
    if p:
        changed = [r for r in p.rows if r.changed]
        rows.append(
            ("tf: locality (Loc)", f"{len(p.rows)} unrelated prompts, {len(changed)} top token changed", _fmt(p.loc))
        )
        rows.append(("tf: next-token agreement", f"KL {p.kl:.4f} nats", _fmt(p.agree)))
        for r in changed[:5]:
            rows.append(("  changed", f"{r.prompt} →{r.before!r} now {r.after!r}", ""))
    title = (
        f"{edit.id}: {edit.method.upper()} at layer {edit.layer}, subject {edit.subject!r} "
        f"({edit.subject_how}), {edit.seconds:.1f} s"
    )
    title += f"; {method_named(edit.method).describe(edit)}"
    return ev.Table(title, ("probe", "prompt", "score"), tuple(rows))


@REGISTRY.command(
    "edit",
    "Change what the model believes: after PROMPT it should say TARGET.",
    Param("prompt", "the prompt; mark the subject with [brackets] or use --subject", required=False),
    Param("target", "the new answer", after_arrow=True, required=False),
    Param(
        "file",
        "a file of facts to edit as one batch (EasyEdit/CounterFact JSON or JSONL, or real-facts JSONL)",
        kind="option",
        required=False,
        metavar="FACTS",
    ),
    Param("subject", "the subject inside the prompt (default: inferred)", kind="option", required=False),
    Param(
        "method",
        "editing method (default: [edit] method in kedit.toml)",
        kind="option",
        required=False,
        choices=METHODS,
    ),
    Param(
        "layer",
        "the layer to edit (default: kedit.toml, else causal tracing)",
        kind="option",
        required=False,
        convert=int,
    ),
    Param("paraphrase", "another wording of the prompt, to check the edit generalises", kind="option", required=False),
    Param(
        "question",
        "the fact asked as a chat question, for the chat probe (default: the prompt as a chat turn)",
        kind="option",
        required=False,
    ),
    Param("stats-corpus", "a text file for ROME's key statistics", kind="option", required=False, metavar="FILE"),
    Param("identity-c", "use C = I instead of key statistics (faster, less local)", kind="flag"),
    details='Example: /edit "[Watts Humphrey] attended" -> "University of Michigan"\n'
    "A batch: /edit --file facts.jsonl --method alphaedit (one ledger entry; /rollback takes it out whole)",
)
def cmd_edit(
    session: Session,
    prompt: str | None,
    target: str | None,
    file: str | None,
    subject: str | None,
    method: str,
    layer: int | None,
    paraphrase: str | None,
    question: str | None,
    stats_corpus: str | None,
    identity_c: bool,
) -> Iterator[ev.Event]:
    result: list[Edit] = []
    if file is not None:
        yield from _edit_file(session, file, prompt, target, subject, method, layer, paraphrase, question, stats_corpus)
        return
    if not prompt or not target:
        command = REGISTRY.get("edit")
        usage = command.usage if command is not None else "/edit"
        raise KeditError(f"/edit needs a prompt and -> a target, or --file FACTS. Usage: {usage}")
    yield from with_progress(
        lambda progress: session.edit(
            prompt,
            target,
            subject=subject,
            method=method,
            layer=layer,
            paraphrases=[paraphrase] if paraphrase else None,
            question=question,
            stats_corpus=input_file(stats_corpus, "the statistics corpus") if stats_corpus else None,
            identity_c=identity_c,
            progress=progress,
        ),
        result,
    )
    yield probe_table(result[0])


def _edit_file(
    session: Session,
    file: str,
    prompt: str | None,
    target: str | None,
    subject: str | None,
    method: str,
    layer: int | None,
    paraphrase: str | None,
    question: str | None,
    stats_corpus: str | None,
) -> Iterator[ev.Event]:
    from kedit.engine.evaluate import read_cases

    if prompt or target:
        raise KeditError("give either a prompt -> target or --file FACTS, not both")
    if subject or paraphrase or question:
        raise KeditError("--subject, --paraphrase and --question belong to one fact; a file's records carry their own")
    cases = read_cases(input_file(file, "the facts file"))
    result: list[Edit] = []
    yield from with_progress(
        lambda progress: session.edit_batch(
            cases,
            method=method,
            layer=layer,
            stats_corpus=input_file(stats_corpus, "the statistics corpus") if stats_corpus else None,
            progress=progress,
        ),
        result,
    )
    yield batch_table(result[0])


def batch_table(edit: Edit) -> ev.Table:
    """The table shown after a batch edit: each figure the share over the batch's facts."""
    p = edit.probe
    g = p.by_gen if p else None
    n = len(edit.facts)
    paras = sum(len(f.get("paraphrases", [])) for f in edit.facts)
    asked = sum(1 for f in edit.facts if f.get("question"))
    rows: list[tuple[str, ...]] = []
    if g is not None:
        rows.append(("gen: rewrite (Rel)", f"{n} prompts whose completion names the new target", _fmt(g.rel)))
        if paras:
            rows.append(("gen: paraphrase", f"{paras} paraphrases whose completion names it", _fmt(g.para)))
        if g.chat is not None:
            rows.append(("gen: chat (+subject)", f"{asked} questions answered with subject and target", _fmt(g.chat)))
        rows.append(
            (
                "gen: locality (Loc)",
                f"{len(p.rows) if p else 0} unrelated prompts still generate their answer",
                _fmt(g.loc),
            )
        )
        for ask, answer in list(g.outputs.items())[:6]:
            rows.append(("  e.g.", f"{ask} ⇒ {_clip(answer)}", ""))
    if p is not None:
        rows.append(("tf: rewrite (Rel)", f"{n} prompts → their targets", _fmt(p.rel)))
        if p.gen is not None:
            rows.append(("tf: paraphrase (Gen)", f"{paras} paraphrases → the targets", _fmt(p.gen)))
        rows.append(("tf: locality (Loc)", f"{len(p.rows)} unrelated prompts", _fmt(p.loc)))
    title = (
        f"{edit.id}: {edit.method.upper()} batch of {n} fact(s), {edit.seconds:.1f} s "
        f"({60 * n / max(edit.seconds, 1e-9):.0f} facts a minute); {method_named(edit.method).describe(edit)}"
    )
    return ev.Table(title, ("probe", "prompts", "score"), tuple(rows))


@REGISTRY.command("edits", "List the edits in force, with their probe figures.")
def cmd_edits(session: Session) -> Iterator[ev.Event]:
    if not session.edits:
        yield ev.Info("no edits in force")
        return
    now = time.time()
    figures = [e.probe.metrics() if e.probe else {} for e in session.edits]
    names = ("gen_rel", "gen_chat", "gen_loc", "tf_rel", "tf_gen", "tf_loc")
    rows = tuple(
        (
            e.id,
            e.method,
            e.title,
            str(e.layer),
            f"{e.seconds:.1f} s",
            f"{(now - e.created) / 60:.0f} min ago",
            *(_fmt(m.get(k)) for k in names),
        )
        for e, m in zip(session.edits, figures)
    )
    yield ev.Table(
        f"{len(rows)} edit(s) in force (gen: by greedy generation; tf: teacher-forced)",
        (
            "id",
            "method",
            "prompt → target",
            "layer",
            "took",
            "made",
            "gen Rel",
            "gen Chat",
            "gen Loc",
            "tf Rel",
            "tf Gen",
            "tf Loc",
        ),
        rows,
    )
    for line in method_state(session.model):
        yield ev.Info(line)


@REGISTRY.command("undo", "Take out the latest edit.")
def cmd_undo(session: Session) -> Iterator[ev.Event]:
    edit = session.undo()
    yield ev.Info(f"rolled back {edit.id}: {edit.title}")


@REGISTRY.command(
    "rollback", "Take out any edit, by id (see /edits).", Param("id", "the edit's id, e.g. e2", complete=_edit_ids)
)
def cmd_rollback(session: Session, id: str) -> Iterator[ev.Event]:
    edit = session.rollback(id)
    yield ev.Info(f"rolled back {edit.id}: {edit.title}; {len(session.edits)} edit(s) still in force")


MAX_TRACE_SAMPLES = 1000


@REGISTRY.command(
    "trace",
    "Causal tracing: how much each layer's MLP at the subject restores the answer.",
    Param("prompt", "a prompt the model completes with a fact"),
    Param("subject", "the subject (default: inferred)", kind="option", required=False),
    Param("target", "the answer to trace (default: the model's own next token)", kind="option", required=False),
    Param("samples", "noise draws to average", kind="option", required=False, default=10, convert=int),
)
def cmd_trace(
    session: Session, prompt: str, subject: str | None, target: str | None, samples: int
) -> Iterator[ev.Event]:
    from kedit.engine.subject import resolve_subject
    from kedit.engine.trace import causal_trace

    if not 1 <= samples <= MAX_TRACE_SAMPLES:
        raise KeditError(f"--samples is how many noise draws to average: 1 to {MAX_TRACE_SAMPLES}, not {samples}")
    if target is not None and not target.strip():
        raise KeditError("--target is empty: give the answer to trace, or leave it out for the model's own")
    clean, subj = resolve_subject(prompt, subject)
    h = session.handle
    with session.lock:
        result = causal_trace(h.model, h.tokenizer, h.adapter, clean, subj.text, target=target, samples=samples)
    yield ev.Info(
        f"causal trace of {clean!r} → {result.answer!r}, subject {subj.text!r} ({subj.how})\n"
        f"P(answer) clean {result.p_clean:.3f}, subject corrupted {result.p_corrupt:.3f}; "
        f"effect of restoring each layer's MLP output at the subject's last token:\n"
        f"{result.chart()}\nbest layer: {result.best_layer}"
    )


@REGISTRY.command(
    "probe",
    "Compare the model now with the unedited model on the locality prompts; "
    "with an edit's id, measure that edit again.",
    Param(
        "id",
        "an edit's id: its Rel and Gen now, and Loc against the unedited model",
        required=False,
        complete=_edit_ids,
    ),
)
def cmd_probe(session: Session, id: str | None) -> Iterator[ev.Event]:
    from kedit.engine.probes import probe_against_unedited, reprobe

    if id is not None:
        reprobe(session, id)
        edit = session.ledger.get(id)
        yield batch_table(edit) if edit.is_batch else probe_table(edit)
        return
    result = probe_against_unedited(session)
    rows = tuple((r.prompt, repr(r.before), repr(r.after), "changed" if r.changed else "") for r in result.rows)
    yield ev.Table(
        f"{len(session.edits)} edit(s) vs none: by generation Loc {_fmt(result.gen_loc)}; "
        f"teacher-forced Loc {result.loc:.2f}, next-token agree {result.agree:.2f}, "
        f"KL {result.kl:.4f}",
        ("prompt", "unedited", "now", ""),
        rows,
    )


@REGISTRY.command(
    "eval",
    "Score the model as it is on an EasyEdit/KnowEdit-format file: Rel by greedy generation; "
    "Rel, Gen, Loc, Port teacher-forced.",
    Param(
        "path",
        "a JSON list or JSONL file of records (prompt, target_new, rephrase_prompt, locality, portability)",
        metavar="FILE",
    ),
    Param("limit", "only the first N records", kind="option", required=False, convert=int),
)
def cmd_eval(session: Session, path: str, limit: int | None) -> Iterator[ev.Event]:
    from kedit.engine.evaluate import evaluate, read_cases
    from kedit.engine.probes import GenSettings

    if limit is not None and limit < 1:
        raise KeditError("--limit takes a positive number of records")
    cases = read_cases(Path(path), limit)
    result: list = []

    def work(progress):
        with session.lock:
            return evaluate(session.handle, cases, progress, GenSettings.from_config(session.config).tokens)

    yield from with_progress(work, result)
    r = result[0]
    yield ev.Table(f"{path}: {r.summary()}", ("prompt", "target", "greedy completion now", "gen hit"), tuple(r.rows))


@REGISTRY.command(
    "export",
    "Write the model with its ROME edits merged into the weights: a transformers folder, "
    "or with --gguf a GGUF for llama.cpp/ollama; vectors that are on go beside it as GGUF.",
    Param("path", "a new folder", metavar="DIR"),
    Param("gguf", "write <source>.kedit.gguf: the GGUF the model was loaded from, edits merged", kind="flag"),
    Param(
        "gguf-type",
        "encoding of the edited GGUF tensors (default q8_0: keeps the edit; source: the file's own type)",
        kind="option",
        required=False,
        choices=("q8_0", "source", "f16", "f32"),
    ),
)
def cmd_export(session: Session, path: str, gguf: bool, gguf_type: str | None) -> Iterator[ev.Event]:
    from kedit.engine.export import export_model

    if gguf_type is not None and not gguf:
        raise KeditError("--gguf-type sets how edited GGUF tensors are written; add --gguf")
    result: list = []
    yield from with_progress(
        lambda progress: export_model(
            session,
            output_path(path, "the export folder", folder=True),
            gguf=gguf,
            gguf_type=gguf_type or "q8_0",
            progress=progress,
        ),
        result,
    )
    done = result[0]
    vectors = f", and {len(done['vectors'])} steering vector(s) as GGUF" if done["vectors"] else ""
    if not gguf:
        yield ev.Info(
            f"exported to {done['folder']}: {len(done['edits'])} edit(s) merged into "
            f"{len(done['merged_modules'])} module(s){vectors}; AutoModelForCausalLM.from_pretrained "
            "loads it"
        )
        return
    tensors = "; ".join(
        f"{t['tensor']} {t['source_type']}→{t['written_type']} (edit reproduced to within "
        f"{100 * t['key_error']:.1f}% along its keys)"
        for t in done["tensors"]
    )
    yield ev.Info(
        f"exported {done['file']} ({done['bytes'] / 2**20:.1f} MiB, {done['seconds']:.0f} s): "
        f"{len(done['edits'])} edit(s) merged into {len(done['tensors'])} tensor(s)"
        f"{': ' + tensors if tensors else ''}; every other tensor and key copied from "
        f"{Path(done['source']).name}{vectors}. Serve it with llama.cpp (llama-cli -m FILE) "
        "or ollama (FROM FILE in a Modelfile)"
    )


@REGISTRY.command(
    "save",
    "Save the session's edits and chat to a file (atomically).",
    Param("path", "file to write, e.g. session.kedit"),
)
def cmd_save(session: Session, path: str) -> Iterator[ev.Event]:
    from kedit.engine.persist import save_session

    written = save_session(session, Path(path))
    yield ev.Info(f"saved {len(session.edits)} edit(s) and {len(session.chat)} message(s) to {written}")


@REGISTRY.command(
    "load",
    "Load a saved session's edits and chat (replacing the current ones).",
    Param("path", "a file written by /save"),
)
def cmd_load(session: Session, path: str) -> Iterator[ev.Event]:
    from kedit.engine.persist import load_session

    edits = load_session(session, Path(path))
    yield ev.Info(f"loaded {len(edits)} edit(s) from {path}")
