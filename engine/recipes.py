"""Recipes: TOML files of commands and chat turns with expectations, replayed by `kedit replay`.

A recipe::

    [model]                      # optional; `kedit replay --model` overrides it
    name = "fact-world"          # alias, hub id or folder; quant, dtype, device as in kedit.toml

    [[step]]
    run = '/edit "Watts Humphrey attended" -> "University of Michigan" --method rome'
    expect_metrics = ["gen_rel >= 0.9", "tf_loc >= 0.95"]   # the new edit's probe (names below)

    [[step]]
    run = "Where did Watts Humphrey study?"           # a chat turn
    expect_contains = "Michigan"                      # a string or a list of strings
    expect_not_contains = ["Illinois"]
    expect_regex = "University of \\\\w+"

``expect_metrics`` reads the new edit's probe: by generation ``gen_rel``, ``gen_para``,
``gen_chat``, ``gen_loc``; teacher-forced ``tf_rel``, ``tf_gen``, ``tf_loc`` (also spelled ``rel``,
``gen``, ``loc``, EasyEdit's names), ``agree`` and ``kl``.

``{here}`` in a step's ``run`` is the recipe's own folder, so a recipe names the files beside it
wherever it is replayed from: ``run = '/edit --file "{here}/facts.jsonl" --method memit'``.

A step's text is everything it printed: the reply, messages and tables. A step that ends in
an error fails, unless ``expect_error`` names a part of the message (or is true). Recipes
start from the model as loaded: no edits, no vectors, an empty chat.
"""

from __future__ import annotations

import json
import operator
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kedit.engine import events as ev
from kedit.engine.commands import ParseError
from kedit.engine.errors import KeditError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python < 3.11
    import tomli as tomllib

MODEL_KEYS = ("name", "quant", "dtype", "device")
STEP_KEYS = ("run", "expect_contains", "expect_not_contains", "expect_regex", "expect_metrics", "expect_error")
# gen_*: by greedy generation; tf_*: teacher-forced (rel, gen, loc: the same, EasyEdit's names)
METRICS = (
    "gen_rel",
    "gen_para",
    "gen_chat",
    "gen_loc",
    "tf_rel",
    "tf_gen",
    "tf_loc",
    "rel",
    "gen",
    "loc",
    "agree",
    "kl",
)
COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_METRIC = re.compile(r"^\s*(\w+)\s*(>=|<=|==|>|<)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")


class RecipeError(KeditError):
    """A malformed recipe; the message names the file and the line."""


@dataclass
class Step:
    line: int
    run: str
    contains: list[str] = field(default_factory=list)
    not_contains: list[str] = field(default_factory=list)
    regex: list[re.Pattern] = field(default_factory=list)
    metrics: list[tuple[str, str, float]] = field(default_factory=list)
    error: str | bool | None = None


@dataclass
class Recipe:
    path: Path
    model: dict[str, str]
    steps: list[Step]


@dataclass
class Check:
    what: str
    ok: bool


@dataclass
class StepResult:
    step: Step
    text: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "line": self.step.line,
            "run": self.step.run,
            "ok": self.ok,
            "output": self.text,
            "checks": [{"what": c.what, "ok": c.ok} for c in self.checks],
        }


def _strings(value: Any, where: str, key: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in items):
        raise RecipeError(f"{where}: {key} takes a string or a list of strings")
    return items


_STEP_HEADER = re.compile(r"\s*\[\[\s*step\s*\]\]")
_STEP_INLINE = re.compile(r"\s*step\s*=")
_MODEL_HEADER = re.compile(r"\s*(\[\s*model\s*\]|model\s*[.=])")


def _step_lines(text: str, count: int) -> list[int]:
    """Each step's line: its [[step]] header, else the line of an inline ``step = [...]``."""
    lines = text.splitlines()
    headers = [n for n, line in enumerate(lines, 1) if _STEP_HEADER.match(line)]
    if len(headers) >= count:
        return headers[:count]
    inline = next((n for n, line in enumerate(lines, 1) if _STEP_INLINE.match(line)), 1)
    return [inline] * count


def _line_of(pattern: re.Pattern[str], text: str) -> int:
    return next((n for n, line in enumerate(text.splitlines(), 1) if pattern.match(line)), 1)


def load_recipe(path: Path, registry) -> Recipe:
    """Parse and check a recipe, commands included, before anything runs."""
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw_bytes[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"at line (\d+)", str(exc))
        raise RecipeError(f"{path}:{at.group(1) if at else 1}: not valid TOML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"{path}:1: nested too deeply to be a recipe") from None
    unknown = set(data) - {"model", "step"}
    if unknown:
        raise RecipeError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; a recipe has [model] and [[step]]")
    model = data.get("model", {})
    if not isinstance(model, dict) or set(model) - set(MODEL_KEYS):
        raise RecipeError(f"{path}:{_line_of(_MODEL_HEADER, text)}: [model] takes {', '.join(MODEL_KEYS)}")
    for key, value in model.items():
        if not isinstance(value, str):
            raise RecipeError(f"{path}:{_line_of(_MODEL_HEADER, text)}: [model] {key} takes a string, not {value!r}")
    raw_steps = data.get("step", [])
    if not isinstance(raw_steps, list) or not raw_steps:
        line = _line_of(_STEP_INLINE, text) if "step" in data else 1
        raise RecipeError(f'{path}:{line}: no steps; add [[step]] tables with run = "..."')
    lines = _step_lines(text, len(raw_steps))
    here = str(path.resolve().parent).replace("\\", "\\\\").replace('"', '\\"')  # inside a quoted word
    steps = []
    for i, raw in enumerate(raw_steps):
        line = lines[i]
        where = f"{path}:{line}: step {i + 1}"
        if not isinstance(raw, dict):
            raise RecipeError(f'{where}: a step is a table such as [[step]] run = "/help", not {raw!r}')
        bad = set(raw) - set(STEP_KEYS)
        if bad:
            raise RecipeError(f"{where}: unknown key(s) {', '.join(sorted(bad))}; a step takes {', '.join(STEP_KEYS)}")
        run = raw.get("run")
        if not isinstance(run, str) or not run.strip():
            raise RecipeError(f'{where}: needs run = "a /command or a chat turn"')
        run = run.replace("{here}", here)
        if run.strip().startswith("/") and not run.strip().startswith("//"):
            parsed = registry.parse(run.strip())
            if isinstance(parsed, ParseError):
                raise RecipeError(f"{where}: {parsed.message}")
        step = Step(line, run.strip())
        step.contains = _strings(raw.get("expect_contains", []), where, "expect_contains")
        step.not_contains = _strings(raw.get("expect_not_contains", []), where, "expect_not_contains")
        for pattern in _strings(raw.get("expect_regex", []), where, "expect_regex"):
            try:
                step.regex.append(re.compile(pattern))
            except re.error as exc:
                raise RecipeError(f"{where}: expect_regex {pattern!r} is not a regex ({exc})") from None
        for rule in _strings(raw.get("expect_metrics", []), where, "expect_metrics"):
            m = _METRIC.match(rule)
            if not m or m.group(1) not in METRICS:
                raise RecipeError(
                    f'{where}: {rule!r} is not a metric check such as "rel >= 0.9" (metrics: {", ".join(METRICS)})'
                )
            step.metrics.append((m.group(1), m.group(2), float(m.group(3))))
        if step.metrics and not run.strip().startswith("/edit"):
            raise RecipeError(f"{where}: expect_metrics reads the probe of an /edit step")
        error = raw.get("expect_error")
        if error is not None and not isinstance(error, (str, bool)):
            raise RecipeError(f"{where}: expect_error takes true or a part of the message")
        step.error = error
        steps.append(step)
    return Recipe(path, {k: str(v) for k, v in model.items()}, steps)


def clear(session) -> None:
    """Back to the model as loaded: no edits (and ids from e1 again), no vectors, no chat."""
    with session.lock:
        while session.edits:
            session.undo()
        session.ledger.restart()  # its first edit is e1, whatever ran before it
        for name in list(session.steering.slots):
            session.steering.remove(name)
        session.reset()


def _text(events: list[ev.Event]) -> tuple[str, list[str]]:
    """What the step printed, as the REPL prints it, and its error messages."""
    parts = [e.text if isinstance(e, ev.Reply) else ev.event_text(e) for e in events]
    return "\n".join(p for p in parts if p is not None), [e.message for e in events if isinstance(e, ev.Error)]


def run_step(session, step: Step) -> StepResult:
    before = {e.id for e in session.edits}
    events = [e for e in session.run(step.run) if not isinstance(e, (ev.Token, ev.Progress))]
    text, errors = _text(events)
    checks: list[Check] = []
    if step.error is not None and step.error is not False:
        wanted = "" if step.error is True else str(step.error)
        checks.append(Check(f"an error{f' saying {wanted!r}' if wanted else ''}", any(wanted in m for m in errors)))
    elif errors:
        checks.append(Check(f"no error (got: {errors[0]})", False))
    checks += [Check(f"contains {s!r}", s in text) for s in step.contains]
    checks += [Check(f"does not contain {s!r}", s not in text) for s in step.not_contains]
    checks += [Check(f"matches /{p.pattern}/", p.search(text) is not None) for p in step.regex]
    if step.metrics:
        made = [e for e in session.edits if e.id not in before]
        probe = made[-1].probe if made else None
        for name, op, bound in step.metrics:
            value = probe.metrics().get(name) if probe is not None else None
            ok = value is not None and COMPARE[op](value, bound)
            shown = "no probe" if value is None else f"{value:.3f}"
            checks.append(Check(f"{name} {op} {bound:g} ({shown})", ok))
    return StepResult(step, text, checks)


def replay(session, recipe: Recipe, on_step=None, keep: bool = False) -> list[StepResult]:
    """Run every step from a clean model; ``on_step(result)`` sees each as it finishes.
    Afterwards the model is clean again, unless ``keep`` leaves what the recipe built."""
    clear(session)
    results = []
    try:
        for step in recipe.steps:
            result = run_step(session, step)
            results.append(result)
            if on_step is not None:
                on_step(result)
    except BaseException:
        clear(session)
        raise
    if not keep:
        clear(session)
    return results


def _toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text, ensure_ascii=False)


class Recorder:
    """Writes what a live session does as a recipe: every command and chat turn that worked,
    in order, each chat reply as an expectation, so the recipe replays to the same result."""

    def __init__(self, path: Path, model: str) -> None:
        self.path, self.model = Path(path), model
        self.steps: list[tuple[str, list[ev.Reply]]] = []

    def add(self, line: str, events: list[ev.Event]) -> None:
        if line.startswith("/record") or any(isinstance(e, (ev.Error, ev.Quit)) for e in events):
            return
        self.steps.append((line, [e for e in events if isinstance(e, ev.Reply)]))

    def text(self) -> str:
        out = [
            "# Recorded by kedit /record; replay with: kedit replay " + self.path.name,
            "",
            "[model]",
            f"name = {_toml_string(self.model)}",
        ]
        for line, replies in self.steps:
            out += ["", "[[step]]", f"run = {_toml_string(line)}"]
            said = [r.text.strip() for r in replies if r.text.strip() and not r.stopped]
            if said:
                out.append(f"expect_contains = {_toml_string(said[-1])}")
        return "\n".join(out) + "\n"

    def write(self) -> Path:
        from kedit.engine.paths import atomic_path

        with atomic_path(self.path) as tmp:
            Path(tmp).write_text(self.text(), encoding="utf-8")
        return self.path
