"""Scoring the model as it stands on an EasyEdit/KnowEdit-format file: `/eval FILE`.

A file is a JSON list (or JSONL) of records. The fields read, in the names EasyEdit's and
KnowEdit's datasets use:

- the prompt: ``prompt`` or ``src``; the new target: ``target_new`` or ``alt``;
- paraphrases: ``rephrase_prompt``, ``rephrase`` or ``rephrase_prompts`` (a string or a list);
- locality: ``locality_prompt`` + ``locality_ground_truth``, ZsRE's ``loc`` + ``loc_ans``, or
  KnowEdit's ``locality: {kind: [{prompt, ground_truth}, ...]}`` (also a single dict);
- portability: KnowEdit's ``portability: {kind: [{prompt, ground_truth}, ...]}``, or ZsRE's
  ``portability: {New Question, New Answer}``.

A ground truth given as a list (of answers, or of lists of aliases) counts its first answer.
CounterFact records (``requested_rewrite``, ``paraphrase_prompts``, ``neighborhood_prompts``) are
read too. A record may carry ``question``, the fact asked in chat. The shared real-facts format (``subject``,
``prompt``, ``question``, ``paraphrase``, ``true``, ``new``, ``paraphrase_known``) is read too: ``new``
is the target, and in a file of such records the other records' facts are each one's locality.

Two protocols, each figure named by its own (``kedit.engine.probes``):

- teacher-forced (EasyEdit's): the share of the answer's tokens that are the argmax after the
  prompt and the answer's earlier tokens; ``tf_rel`` on the target, ``tf_gen`` on the
  paraphrases, ``tf_loc`` and ``tf_port`` on the files' ground truths.
- generation-based: greedy generation to the model's stop or a small cap, a hit when the target
  appears; ``gen_rel`` on the prompt, ``gen_para`` on the paraphrases (on real-facts records,
  only where the unedited model completed the paraphrase right), ``gen_chat`` on the question
  under the chat template (the answer must name the subject too), ``gen_loc`` the locality
  prompts that still generate the ground truth they generated before, ``gen_loc_chat`` the same
  for the other records' questions asked in chat (real-facts records on a chat model).

`/eval` scores the model as it is; `kedit eval` edits each record and measures it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.engine.errors import KeditError
from kedit.engine.methods import as_continuation
from kedit.engine.metrics import mean_accuracy, teacher_forced


@dataclass
class EvalCase:
    prompt: str
    target: str
    subject: str | None = None
    rephrase: list[str] = field(default_factory=list)
    locality: list[tuple[str, str]] = field(default_factory=list)
    portability: list[tuple[str, str]] = field(default_factory=list)
    question: str | None = None  # the fact asked in chat
    true: str | None = None  # what the unedited model says (real-facts records)
    paraphrase_known: bool | None = None  # whether the unedited model completes the paraphrase right
    locality_chat: list[tuple[str, str]] = field(default_factory=list)  # (question, answer) asked in chat


@dataclass
class EvalResult:
    n: int
    rel: float
    gen: float | None
    loc: float | None
    port: float | None
    rows: list[tuple[str, str, str, str]]  # prompt, target, the model's greedy completion now, hit by generation
    gen_rel: float | None = None  # share of prompts whose greedy completion names the target

    def summary(self) -> str:
        def f(x: float | None) -> str:
            return "—" if x is None else f"{x:.2f}"

        return (
            f"{self.n} case(s), by generation: Rel {f(self.gen_rel)} | teacher-forced: Rel {f(self.rel)} · "
            f"Gen {f(self.gen)} · Loc {f(self.loc)} · Port {f(self.port)}"
        )


def _answer(value: Any) -> str | None:
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    return None if value is None else str(value)


def _pairs(block: Any) -> list[tuple[str, str]]:
    """KnowEdit's {kind: [{prompt, ground_truth}]} (or a bare list or dict) as (prompt, answer)."""
    items: list[Any] = []
    if isinstance(block, dict) and "New Question" in block:  # ZsRE's portability
        answer = _answer(block.get("New Answer"))
        return [(str(block["New Question"]), answer)] if block["New Question"] and answer else []
    if isinstance(block, dict) and "prompt" in block:
        items = [block]
    elif isinstance(block, dict):
        for value in block.values():
            items += value if isinstance(value, list) else [value]
    elif isinstance(block, list):
        items = block
    out = []
    for item in items:
        if isinstance(item, dict):
            prompts = item.get("prompt")
            answer = _answer(item.get("ground_truth"))
            for p in prompts if isinstance(prompts, list) else [prompts]:
                if p and answer:
                    out.append((str(p), answer))
    return out


def _counterfact(record: dict[str, Any], where: str) -> EvalCase:
    """A CounterFact record: ``requested_rewrite`` {prompt with "{}", subject, target_new {str},
    target_true {str}}, ``paraphrase_prompts``, ``neighborhood_prompts`` (locality, answered with
    the true target)."""
    rw = record["requested_rewrite"]
    if not isinstance(rw, dict):
        raise KeditError(f"{where}: requested_rewrite must be an object")
    template, subject = rw.get("prompt"), rw.get("subject")
    new = rw.get("target_new", {})
    target = _answer(new.get("str") if isinstance(new, dict) else new)
    if not isinstance(template, str) or "{}" not in template or not subject or not target:
        raise KeditError(f"{where}: requested_rewrite needs a prompt with '{{}}', a subject and target_new.str")
    true = rw.get("target_true", {})
    true_text = _answer(true.get("str") if isinstance(true, dict) else true)
    paraphrases = record.get("paraphrase_prompts", [])
    neighbours = record.get("neighborhood_prompts", [])
    return EvalCase(
        template.replace("{}", str(subject)),
        target,
        str(subject),
        [str(p) for p in paraphrases if p] if isinstance(paraphrases, list) else [],
        [(str(p), true_text) for p in neighbours if p] if true_text and isinstance(neighbours, list) else [],
        true=None,
    )


def _case(record: Any, where: str) -> EvalCase:
    if not isinstance(record, dict):
        raise KeditError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    if "requested_rewrite" in record:
        return _counterfact(record, where)
    prompt = record.get("prompt", record.get("src"))
    target = _answer(record.get("target_new", record.get("alt", record.get("new"))))
    if not prompt or not target:
        raise KeditError(f"{where}: a record needs 'prompt' (or 'src') and 'target_new' (or 'alt', or 'new')")
    rephrase = record.get(
        "rephrase_prompt", record.get("rephrase", record.get("rephrase_prompts", record.get("paraphrase", [])))
    )
    rephrase = [str(r) for r in (rephrase if isinstance(rephrase, list) else [rephrase]) if r]
    locality = _pairs(record.get("locality", {}))
    for p_key, a_key in (("locality_prompt", "locality_ground_truth"), ("loc", "loc_ans")):
        answer = _answer(record.get(a_key))
        if record.get(p_key) and answer:
            locality.append((str(record[p_key]), answer))
    subject = record.get("subject")
    known = record.get("paraphrase_known")
    return EvalCase(
        str(prompt),
        target,
        str(subject) if subject else None,
        rephrase,
        locality,
        _pairs(record.get("portability", {})),
        str(record["question"]) if record.get("question") else None,
        _answer(record.get("true")),
        bool(known) if known is not None else None,
    )


def _real_facts_locality(cases: list[EvalCase]) -> None:
    """Real-facts records carry no locality of their own: each gets the other records' facts, as
    completions and, where they have a question, as chat questions."""
    if not all(c.true and not c.locality for c in cases):
        return
    for c in cases:
        others = [o for o in cases if o is not c and o.subject != c.subject and o.true]
        c.locality = [(o.prompt, o.true) for o in others if o.true]
        c.locality_chat = [(o.question, o.true) for o in others if o.question and o.true]


def read_cases(path: Path, limit: int | None = None) -> list[EvalCase]:
    """The records of a JSON list or JSONL file; every problem is a KeditError naming the place."""
    from kedit.engine.checks import read_text

    text = read_text(path, "the eval file")
    if limit is not None and limit < 1:
        raise KeditError(f"--limit counts records: 1 or more, not {limit}")
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
        where = [f"{path}: record {i + 1}" for i in range(len(records))]
    except RecursionError:
        raise KeditError(f"{path} nests its JSON too deeply to be a list of records") from None
    except json.JSONDecodeError:
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise KeditError(f"{path}:{n}: not JSON ({exc.msg})") from None
                except RecursionError:
                    raise KeditError(f"{path}:{n}: JSON nested too deeply") from None
                where.append(f"{path}:{n}")
    if not records:
        raise KeditError(f"{path} holds no records")
    cases = [_case(r, w) for r, w in zip(records, where)]
    _real_facts_locality(cases)
    return cases[:limit] if limit else cases


def insertion_cases(n: int) -> list[EvalCase]:
    """The first n facts of the generated knowledge-insertion set (kedit.engine.insertion)."""
    from kedit.engine.insertion import insertion_records

    try:
        records = insertion_records(n)
    except ValueError as exc:
        raise KeditError(str(exc)) from None
    return [_case(r, f"insertion fact {i + 1}") for i, r in enumerate(records)]


def _score(model, tok, pairs: Sequence[tuple[str, str]]) -> float | None:
    if not pairs:
        return None
    return mean_accuracy(teacher_forced(model, tok, [p for p, _ in pairs], [as_continuation(p, a) for p, a in pairs]))


def evaluate(
    handle, cases: Sequence[EvalCase], progress: Callable[[str, int, int], None] | None = None, gen_tokens: int = 16
) -> EvalResult:
    """The model as it is, case by case: Rel by greedy generation (up to ``gen_tokens``), and
    Rel, Gen, Loc and Port teacher-forced."""
    from kedit.engine.metrics import greedy, mentions

    model, tok = handle.model, handle.tokenizer
    rel: list[tuple[str, str]] = []
    gen: list[tuple[str, str]] = []
    loc: list[tuple[str, str]] = []
    port: list[tuple[str, str]] = []
    for c in cases:
        rel.append((c.prompt, c.target))
        gen += [(r, c.target) for r in c.rephrase]
        loc += c.locality
        port += c.portability
    rows = []
    scored = []
    hits = 0
    for i, (p, t) in enumerate(rel):
        scored += teacher_forced(model, tok, [p], [as_continuation(p, t)])
        said = greedy(model, tok, [p], gen_tokens)[0]
        hit = mentions(said, t)
        hits += hit
        rows.append((p, t, " ".join(said.split()), "yes" if hit else ""))
        if progress:
            progress("scoring the eval file", i + 1, len(rel))
    return EvalResult(
        len(cases),
        mean_accuracy(scored),
        _score(model, tok, gen),
        _score(model, tok, loc),
        _score(model, tok, port),
        rows,
        hits / len(rel) if rel else None,
    )


# -- editing, then measuring: `kedit eval` ------------------------------------------------


PROTOCOLS = ("both", "tf", "gen")


def chat_answers(handle, questions: Sequence[str], settings) -> list[str]:
    """Greedy chat answers to questions, each the first user turn under the chat template."""
    from kedit.engine.metrics import chat_text, greedy

    texts = [chat_text(handle.tokenizer, q) for q in questions]
    return greedy(handle.model, handle.tokenizer, texts, settings.chat_tokens, special=False)


def chat_kept(handle, pairs: Sequence[tuple[str, str]], before: dict[str, str], settings) -> float | None:
    """Of the other facts' chat answers that named their answer before the edit, the share that still do."""
    from kedit.engine.metrics import kept_share

    now = chat_answers(handle, [q for q, _ in pairs], settings)
    return kept_share([a for _, a in pairs], [before[q] for q, _ in pairs], now)


def settle_paraphrases(handle, cases: Sequence[EvalCase], settings) -> list[EvalCase]:
    """The cases with ``paraphrase_known`` filled in where a real-facts record leaves it out:
    whether the model as it stands (unedited) names the true answer after any paraphrase, by
    the same greedy completion ``gen_para`` reads. Such a paraphrase measures nothing about an
    edit when the model never answered it."""
    from dataclasses import replace

    from kedit.engine.metrics import greedy, mentions

    todo = [c for c in cases if c.true and c.rephrase and c.paraphrase_known is None]
    if not todo:
        return list(cases)
    texts = list(dict.fromkeys(p for c in todo for p in c.rephrase))
    said = dict(zip(texts, greedy(handle.model, handle.tokenizer, texts, settings.tokens, batch_size=1)))
    unsettled = {id(c) for c in todo}
    return [
        replace(c, paraphrase_known=any(mentions(said[p], c.true or "") for p in c.rephrase))
        if id(c) in unsettled
        else c
        for c in cases
    ]


def _measure(
    handle,
    case: EvalCase,
    subject: str,
    loc,
    before,
    loc_before: list[str] | None,
    protocol: str,
    settings,
    chat_before: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One case's figures with its edit in force, by the chosen protocols, with the probes' own code:
    teacher-forced Rel, Gen and Loc (unchanged argmax share against ``before``) and Port; and by
    generation Rel, Para, Chat and Loc (against ``loc_before``, the unedited model's generations)."""
    from kedit.engine.probes import by_generation, probe

    target = as_continuation(case.prompt, case.target)
    row: dict[str, Any] = {}
    if protocol in ("both", "gen"):
        g = by_generation(
            handle,
            case.prompt,
            target,
            case.rephrase,
            subject,
            case.question,
            settings,
            loc if loc.prompts else None,
            loc_before,
        )
        para = g.para if case.paraphrase_known is not False else None  # not counted: unknown before
        row.update(gen_rel=g.rel, gen_para=para, gen_chat=g.chat, gen_loc=g.loc, outputs=g.outputs)
        if case.locality_chat and chat_before is not None:
            row["gen_loc_chat"] = chat_kept(handle, case.locality_chat, chat_before, settings)
    if protocol in ("both", "tf"):
        result = probe(handle, case.prompt, target, case.rephrase, loc, before)
        row.update(
            tf_rel=result.rel,
            tf_gen=result.gen,
            tf_loc=result.loc if loc.prompts else None,
            tf_port=_score(handle.model, handle.tokenizer, case.portability),
        )
    return row


def _edit_case(session, case: EvalCase, method: str | None):
    """One record as a single edit, without the edit's own probe: the evaluation measures it."""
    return session.edit(
        case.prompt,
        case.target,
        subject=case.subject,
        method=method,
        paraphrases=case.rephrase,
        question=case.question,
        probe=False,
    )


def edit_and_measure(
    session,
    cases: Sequence[EvalCase],
    method: str | None,
    sequential: bool,
    progress: Callable[[str, int, int], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    protocol: str = "both",
) -> list[dict[str, Any]]:
    """Edit each case and measure it, EasyEdit's way, by ``protocol`` ("tf", "gen" or "both").
    Single mode: each edit is measured and rolled back before the next. Sequential: every edit
    is made, then all are measured after the last, then all are rolled back. The model ends as
    it began."""
    from kedit.engine.metrics import greedy
    from kedit.engine.probes import GenSettings, LocalitySet, snapshot

    if protocol not in PROTOCOLS:
        raise KeditError(f"unknown protocol {protocol!r}; use tf, gen or both")
    handle = session.handle
    settings = GenSettings.from_config(session.config)
    if protocol != "tf":
        cases = settle_paraphrases(handle, cases, settings)
    locs = [LocalitySet([p for p, _ in c.locality], [as_continuation(p, a) for p, a in c.locality]) for c in cases]
    befores = [snapshot(handle, loc) for loc in locs]  # the unedited model's predictions
    generated: dict[str, str] = {}  # the unedited model's generation after each locality prompt
    if protocol != "tf":
        prompts = list(dict.fromkeys(p for loc in locs for p in loc.prompts))
        generated = dict(zip(prompts, greedy(handle.model, handle.tokenizer, prompts, settings.locality_tokens)))
    loc_befores = [[generated[p] for p in loc.prompts] if generated else None for loc in locs]
    chat_before: dict[str, str] | None = None  # the unedited model's chat answers to the other facts' questions
    if protocol != "tf" and handle.is_chat:
        questions = list(dict.fromkeys(q for c in cases for q, _ in c.locality_chat))
        chat_before = dict(zip(questions, chat_answers(handle, questions, settings)))
    rows: list[dict[str, Any]] = []
    made = []
    try:
        for i, case in enumerate(cases):
            edit = _edit_case(session, case, method)
            made.append(edit)
            row = {
                "case": i,
                "prompt": case.prompt,
                "target": case.target,
                "subject": edit.subject,
                "method": edit.method,
                "seconds": edit.seconds,
            }
            if not sequential:
                row.update(
                    _measure(
                        handle, case, edit.subject, locs[i], befores[i], loc_befores[i], protocol, settings, chat_before
                    )
                )
                session.rollback(made.pop().id)
                if on_record:
                    on_record(row)
            rows.append(row)
            if progress:
                progress(f"{'sequential' if sequential else 'single'} edits", i + 1, len(cases))
        if sequential:
            for i, case in enumerate(cases):
                rows[i].update(
                    _measure(
                        handle,
                        case,
                        rows[i]["subject"],
                        locs[i],
                        befores[i],
                        loc_befores[i],
                        protocol,
                        settings,
                        chat_before,
                    )
                )
                if on_record:
                    on_record(rows[i])
    finally:
        for edit in reversed(made):
            session.rollback(edit.id)
    return rows


FIGURES = ("gen_rel", "gen_para", "gen_chat", "gen_loc", "gen_loc_chat", "tf_rel", "tf_gen", "tf_loc", "tf_port")


def averages(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """The mean of each figure over the records that have it (None where none has)."""
    out: dict[str, float | None] = {}
    for key in FIGURES:
        if not any(key in r for r in rows):
            continue
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


# -- many edits in batches: `kedit eval --sequential N --batch B` --------------------------------


def locality_cases(
    cases: Sequence[EvalCase], others: Sequence[EvalCase]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The prompts (and chat questions) whose answers a run of edits must keep: every case's own
    locality pairs and, from ``others`` (a real-facts file), each fact the model knows; none
    about a subject the run edits, nor one of its own prompts or questions (a real-facts file's
    records are each other's locality)."""
    edited = {c.subject for c in cases if c.subject}
    asked = {c.prompt for c in cases} | {c.question for c in cases if c.question}
    pairs = [p for c in cases for p in c.locality if p[0] not in asked]
    pairs += [(o.prompt, o.true) for o in others if o.true and o.subject not in edited and o.prompt not in asked]
    chat = [
        (o.question, o.true)
        for o in others
        if o.true and o.question and o.subject not in edited and o.question not in asked
    ]
    return list(dict.fromkeys(pairs)), list(dict.fromkeys(chat))


def _facts(edit, cases: Sequence[EvalCase]) -> list[dict[str, Any]]:
    """The facts an edit of ``cases`` made, as ``probes.batch_figures`` reads them; paraphrases
    are left out where the unedited model did not answer them (``paraphrase_known`` false)."""
    facts = edit.facts or [
        {
            "prompt": edit.prompt,
            "subject": edit.subject,
            "target": edit.target,
            "paraphrases": list(edit.paraphrases),
            "question": edit.question,
        }
    ]
    return [f if c.paraphrase_known is not False else {**f, "paraphrases": []} for f, c in zip(facts, cases)]


@torch.no_grad()
def _logits(handle, texts: Sequence[str]) -> torch.Tensor:
    from kedit.engine.metrics import pad_right

    tok = handle.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = pad_right([tok(t)["input_ids"] for t in texts], pad, next(handle.model.parameters()).device)
    return handle.model(input_ids=ids, attention_mask=mask).logits.float()


def _by_batch(hits: Sequence[bool], sizes: Sequence[int]) -> list[float]:
    """The share of hits in each consecutive run of ``sizes``."""
    out, at = [], 0
    for n in sizes:
        out.append(sum(hits[at : at + n]) / n if n else 0.0)
        at += n
    return out


def edit_in_batches(
    session,
    cases: Sequence[EvalCase],
    method: str | None,
    batch: int,
    progress: Callable[[str, int, int], None] | None = None,
    others: Sequence[EvalCase] = (),
) -> dict[str, Any]:
    """Edit ``cases`` in batches of ``batch`` (each one ledger entry), one after another, then
    measure every fact after the last batch, by both protocols. A method that edits one fact at
    a time (ROME, GRACE, WISE) takes ``batch`` 1: sequential single edits, measured the same way.

    - by generation: Rel (the prompt's completion names the target), Para (the paraphrases'),
      Chat (the question's answer names subject and target, chat models), Loc (locality prompts
      that still generate the answer they generated before) and Loc chat (the same for the
      questions of ``others``);
    - teacher-forced: Rel, Gen (paraphrases) and Loc (EasyEdit's);
    - perplexity on neutral text (kedit.engine.metrics.NEUTRAL_TEXT), edited against unedited;
    - seconds per batch and edits per minute (the edits' own time: no probes).

    Then every batch is rolled back, newest first, and the logits on the locality prompts are
    compared with the unedited model's (``rollback_exact``: ``torch.equal``)."""
    from kedit.engine.editing import default_method
    from kedit.engine.methods.table import method_named
    from kedit.engine.metrics import NEUTRAL_TEXT, greedy, kept_share, lost, perplexity
    from kedit.engine.probes import GenSettings, LocalitySet, batch_figures, locality, snapshot

    if batch < 1:
        raise KeditError("--batch takes a positive number of facts")
    method = method or default_method(session.config)
    one_by_one = not method_named(method).batches
    if one_by_one and batch != 1:
        raise KeditError(f"{method} edits one fact at a time: use --batch 1, or a batch method (memit, alphaedit)")
    handle = session.handle
    settings = GenSettings.from_config(session.config)
    loc_pairs, loc_chat = locality_cases(cases, others)
    if loc_pairs:
        loc = LocalitySet([p for p, _ in loc_pairs], [as_continuation(p, a) for p, a in loc_pairs])
    else:  # nothing left unedited: kedit.toml's locality prompts, with the model's own answers
        loc = session.locality(exclude={c.subject for c in cases if c.subject})
    with session.lock:
        cases = settle_paraphrases(handle, cases, settings)
        before = snapshot(handle, loc) if loc.prompts else []
        loc_said = greedy(handle.model, handle.tokenizer, loc.prompts, settings.locality_tokens) if loc.prompts else []
        chat_before = dict(zip([q for q, _ in loc_chat], chat_answers(handle, [q for q, _ in loc_chat], settings)))
        ppl_before = perplexity(handle.model, handle.tokenizer, NEUTRAL_TEXT)
        probe_texts = [*loc.prompts[:16], *NEUTRAL_TEXT[:4]]
        logits_before = _logits(handle, probe_texts)
    made = []
    seconds: list[float] = []
    try:
        chunks = [list(cases[i : i + batch]) for i in range(0, len(cases), batch)]
        for n, chunk in enumerate(chunks):
            started = time.perf_counter()
            if one_by_one:  # the edit's own compute time
                made.append(_edit_case(session, chunk[0], method))
                seconds.append(made[-1].info.timings["compute"])
            else:
                made.append(session.edit_batch(chunk, method=method, probe=False))
                seconds.append(time.perf_counter() - started)
            if progress:
                progress(f"batches of {batch}" if not one_by_one else "edits, one after another", n + 1, len(chunks))
        per_batch = [_facts(e, chunk) for e, chunk in zip(made, chunks)]
        facts = [f for b in per_batch for f in b]
        with session.lock:
            if progress:
                progress("measuring every fact after the last batch", 0, 1)
            rel, gen, g = batch_figures(handle, facts, settings)
            moved = locality(handle, loc, before) if loc.prompts else None
            now = greedy(handle.model, handle.tokenizer, loc.prompts, settings.locality_tokens) if loc.prompts else []
            questions, chat_truth = [q for q, _ in loc_chat], [a for _, a in loc_chat]
            chat_now = chat_answers(handle, questions, settings) if loc_chat else []
            chat_was = [chat_before[q] for q in questions]
            kept = kept_share(loc.answers, loc_said, now)  # None where none was answered before
            chat_kept_now = kept_share(chat_truth, chat_was, chat_now)
            gone = [(loc.prompts[i], now[i]) for i in lost(loc.answers, loc_said, now)]
            gone_chat = [(questions[i], chat_now[i]) for i in lost(chat_truth, chat_was, chat_now)]
            ppl_after = perplexity(handle.model, handle.tokenizer, NEUTRAL_TEXT)
    finally:
        for edit in reversed(made):
            session.rollback(edit.id)
    with session.lock:
        exact = bool(torch.equal(_logits(handle, probe_texts), logits_before))
    total = sum(seconds)
    return {
        "n": len(cases),
        "batch": batch,
        "batches": len(seconds),
        "method": made[0].method if made else method,
        "gen_rel": g.rel,
        # Rel over each batch's own facts, oldest first: how earlier batches fade under later ones
        "gen_rel_by_batch": _by_batch(g.hits, [len(b) for b in per_batch]),
        "gen_para": g.para,
        "gen_chat": g.chat,
        "gen_loc": kept,
        "gen_loc_chat": chat_kept_now,
        "tf_rel": rel,
        "tf_gen": gen,
        "tf_loc": moved.loc if moved else None,
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "ppl_ratio": ppl_after / ppl_before,
        "seconds_per_batch": seconds,
        "edits_per_minute": 60 * len(cases) / total if total else None,
        "rollback_exact": exact,
        "locality_prompts": len(loc.prompts),
        "locality_questions": len(loc_chat),
        "missed": g.missed,  # (prompt or "chat: " question, what it generates now) for each edit that missed
        "loc_lost": gone,  # (prompt, what it generates now) for each one that lost its answer
        "loc_chat_lost": gone_chat,
    }
