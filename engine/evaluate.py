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

The metrics are EasyEdit's, by teacher forcing: the share of the answer's tokens that are
the argmax after the prompt and the answer's earlier tokens. Rel is on the target, Gen on
the paraphrases, Loc and Port on the files' ground truths. On the unedited model Rel is how
often it already says the new target; after edits it is how well they took.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class EvalResult:
    n: int
    rel: float
    gen: float | None
    loc: float | None
    port: float | None
    rows: list[tuple[str, str, str, str]]  # prompt, target, the model's first token now, hit

    def summary(self) -> str:
        def f(x: float | None) -> str:
            return "—" if x is None else f"{x:.2f}"

        return f"{self.n} case(s): Rel {f(self.rel)} · Gen {f(self.gen)} · Loc {f(self.loc)} · Port {f(self.port)}"


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


def _case(record: Any, where: str) -> EvalCase:
    if not isinstance(record, dict):
        raise KeditError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    prompt = record.get("prompt", record.get("src"))
    target = _answer(record.get("target_new", record.get("alt")))
    if not prompt or not target:
        raise KeditError(f"{where}: a record needs 'prompt' (or 'src') and 'target_new' (or 'alt')")
    rephrase = record.get("rephrase_prompt", record.get("rephrase", record.get("rephrase_prompts", [])))
    rephrase = [str(r) for r in (rephrase if isinstance(rephrase, list) else [rephrase]) if r]
    locality = _pairs(record.get("locality", {}))
    for p_key, a_key in (("locality_prompt", "locality_ground_truth"), ("loc", "loc_ans")):
        answer = _answer(record.get(a_key))
        if record.get(p_key) and answer:
            locality.append((str(record[p_key]), answer))
    subject = record.get("subject")
    return EvalCase(str(prompt), target, str(subject) if subject else None, rephrase, locality,
                    _pairs(record.get("portability", {})))


def read_cases(path: Path, limit: int | None = None) -> list[EvalCase]:
    """The records of a JSON list or JSONL file; every problem is a KeditError naming the place."""
    if not path.is_file():
        raise KeditError(f"no eval file {path}; give a JSON or JSONL file in EasyEdit/KnowEdit format")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
        where = [f"{path}: record {i + 1}" for i in range(len(records))]
    except json.JSONDecodeError:
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise KeditError(f"{path}:{n}: not JSON ({exc.msg})") from None
                where.append(f"{path}:{n}")
    if not records:
        raise KeditError(f"{path} holds no records")
    cases = [_case(r, w) for r, w in zip(records, where)]
    return cases[:limit] if limit else cases


def _score(model, tok, pairs: Sequence[tuple[str, str]]) -> float | None:
    if not pairs:
        return None
    return mean_accuracy(teacher_forced(model, tok, [p for p, _ in pairs],
                                        [as_continuation(p, a) for p, a in pairs]))


def evaluate(handle, cases: Sequence[EvalCase],
             progress: Callable[[str, int, int], None] | None = None) -> EvalResult:
    """Rel, Gen, Loc and Port of the model as it is, case by case."""
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
    for i, (p, t) in enumerate(rel):
        scored += teacher_forced(model, tok, [p], [as_continuation(p, t)])
        s = scored[-1]
        rows.append((p, t, tok.decode(s.predicted[:1]), "yes" if s.accuracy == 1.0 else ""))
        if progress:
            progress("scoring the eval file", i + 1, len(rel))
    return EvalResult(len(cases), mean_accuracy(scored), _score(model, tok, gen), _score(model, tok, loc),
                      _score(model, tok, port), rows)


# -- editing, then measuring: `kedit eval` ------------------------------------------------


def _measure(handle, case: EvalCase, loc, before) -> dict[str, Any]:
    """EasyEdit's four figures for one case with its edit in force: the probe's own code for
    Rel, Gen and Loc (unchanged argmax share against ``before``), and Port."""
    from kedit.engine.probes import probe

    result = probe(handle, case.prompt, as_continuation(case.prompt, case.target), case.rephrase, loc, before)
    return {"rel": result.rel, "gen": result.gen, "loc": result.loc if loc.prompts else None,
            "port": _score(handle.model, handle.tokenizer, case.portability)}


def edit_and_measure(session, cases: Sequence[EvalCase], method: str | None, sequential: bool,
                     progress: Callable[[str, int, int], None] | None = None,
                     on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Edit each case and measure it, EasyEdit's way. Single mode: each edit is measured and
    rolled back before the next. Sequential: every edit is made, then all are measured after
    the last, then all are rolled back. The model ends as it began."""
    from kedit.engine.probes import LocalitySet, snapshot

    handle = session.handle
    locs = [LocalitySet([p for p, _ in c.locality], [as_continuation(p, a) for p, a in c.locality]) for c in cases]
    befores = [snapshot(handle, loc) for loc in locs]  # the unedited model's predictions
    rows: list[dict[str, Any]] = []
    made = []
    try:
        for i, case in enumerate(cases):
            edit = session.edit(case.prompt, case.target, subject=case.subject, method=method)
            made.append(edit)
            row = {"case": i, "prompt": case.prompt, "target": case.target, "method": edit.method,
                   "seconds": edit.seconds}
            if not sequential:
                row.update(_measure(handle, case, locs[i], befores[i]))
                session.rollback(made.pop().id)
                if on_record:
                    on_record(row)
            rows.append(row)
            if progress:
                progress(f"{'sequential' if sequential else 'single'} edits", i + 1, len(cases))
        if sequential:
            for i, case in enumerate(cases):
                rows[i].update(_measure(handle, case, locs[i], befores[i]))
                if on_record:
                    on_record(rows[i])
    finally:
        for edit in reversed(made):
            session.rollback(edit.id)
    return rows


def averages(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("rel", "gen", "loc", "port"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out
