"""The command registry: one table of slash commands for the REPL, the TUI, recipes and /help.

Grammar (parsed here and nowhere else)::

    /name word "quoted words" 'single quoted' --option value --option=value --flag
    /edit "Watts Humphrey attended" -> "University of Michigan" --method rome

Double-quoted strings take backslash escapes (\\" and \\\\). ``->`` separates the two
sides of commands that take one. Parsing never raises: a bad line gives a ``ParseError``
whose message says what is wrong and shows the command's usage.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

ARROW = "->"


@dataclass(frozen=True)
class Lexeme:
    """One word of a command line."""

    kind: Literal["word", "quoted", "arrow"]
    text: str
    start: int


@dataclass(frozen=True)
class ParseError:
    """A command line that could not be understood; ``message`` tells the user why."""

    message: str


def lex(line: str) -> list[Lexeme] | ParseError:
    """Split a command line into words, quoted strings and arrows."""
    out: list[Lexeme] = []
    i, n = 0, len(line)
    while i < n:
        ch = line[i]
        if ch.isspace():
            i += 1
        elif ch in "\"'":
            start, quote, buf = i, ch, []
            i += 1
            while i < n and line[i] != quote:
                if quote == '"' and line[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(line[i])
                i += 1
            if i >= n:
                return ParseError(f"unterminated {quote} quote starting at column {start + 1}")
            out.append(Lexeme("quoted", "".join(buf), start))
            i += 1
        elif line.startswith(ARROW, i):
            out.append(Lexeme("arrow", ARROW, i))
            i += len(ARROW)
        else:
            start = i
            while i < n and not line[i].isspace() and line[i] not in "\"'" and not line.startswith(ARROW, i):
                i += 1
            out.append(Lexeme("word", line[start:i], start))
    return out


def quote(text: str) -> str:
    """``text`` as one double-quoted word that ``lex`` reads back unchanged."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


Completer = Callable[[Any, str], Iterable[str]]


@dataclass(frozen=True)
class Param:
    """One argument of a command."""

    name: str
    help: str
    kind: Literal["positional", "option", "flag"] = "positional"
    required: bool = True
    default: Any = None
    choices: Collection[str] | None = None  # a live collection (a table's keys) sees later additions
    convert: Callable[[str], Any] | None = None  # e.g. int or float; ValueError means bad input
    after_arrow: bool = False  # a positional that follows "->"
    rest: bool = False  # a positional that takes every remaining word, joined by spaces
    complete: Completer | None = None  # (session, prefix) -> candidates
    metavar: str | None = None

    @property
    def label(self) -> str:
        return self.metavar or self.name.upper()

    @property
    def key(self) -> str:
        """The handler's keyword for this argument ("stats-corpus" -> "stats_corpus")."""
        return self.name.replace("-", "_")


@dataclass(frozen=True)
class Command:
    """A slash command: its name, arguments, help and handler."""

    name: str
    summary: str
    handler: Callable[..., Iterable[Any]]
    params: tuple[Param, ...] = ()
    aliases: tuple[str, ...] = ()
    details: str = ""

    @property
    def usage(self) -> str:
        parts = [f"/{self.name}"]
        for p in self.params:
            if p.kind == "positional":
                text = f'"{p.label}"' if p.rest or p.after_arrow or p.name in ("prompt", "target") else p.label
                if p.after_arrow:
                    parts.append(ARROW)
                parts.append(text if p.required else f"[{text}]")
            elif p.kind == "option":
                value = "|".join(p.choices) if p.choices else p.label
                parts.append(f"[--{p.name} {value}]")
            else:
                parts.append(f"[--{p.name}]")
        return " ".join(parts)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name and p.kind != "positional"), None)


@dataclass(frozen=True)
class Invocation:
    """A parsed command line: the command and its converted arguments."""

    command: Command
    args: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Every slash command kedit knows, by name and alias."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self._aliases: dict[str, str] = {}

    def add(self, command: Command) -> Command:
        if command.name in self._commands or command.name in self._aliases:
            raise ValueError(f"command /{command.name} is registered twice")
        self._commands[command.name] = command
        for alias in command.aliases:
            self._aliases[alias] = command.name
        return command

    def command(
        self, name: str, summary: str, *params: Param, aliases: Sequence[str] = (), details: str = ""
    ) -> Callable[[Callable[..., Iterable[Any]]], Callable[..., Iterable[Any]]]:
        """Decorator: register ``fn(session, **args)`` as ``/name``."""

        def wrap(fn: Callable[..., Iterable[Any]]) -> Callable[..., Iterable[Any]]:
            self.add(Command(name, summary, fn, tuple(params), tuple(aliases), details))
            return fn

        return wrap

    def get(self, name: str) -> Command | None:
        return self._commands.get(self._aliases.get(name, name))

    def __iter__(self):
        return iter(sorted(self._commands.values(), key=lambda c: c.name))

    def names(self) -> list[str]:
        return sorted([*self._commands, *self._aliases])

    # -- parsing -------------------------------------------------------------------------

    def parse(self, line: str) -> Invocation | ParseError:
        """Parse one slash-command line. Never raises."""
        try:
            return self._parse(line)
        except Exception as exc:  # a bug here must still not reach the user as a traceback
            return ParseError(f"could not parse the command: {exc}")

    def _parse(self, line: str) -> Invocation | ParseError:
        text = line.strip()
        if not text.startswith("/"):
            return ParseError("a command starts with '/'; type /help to list them")
        lexed = lex(text[1:])
        if isinstance(lexed, ParseError):
            return lexed
        if not lexed or lexed[0].kind != "word":
            return ParseError("a command name must follow '/'; type /help to list them")
        name = lexed[0].text
        cmd = self.get(name)
        if cmd is None:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" Did you mean /{close[0]}?" if close else ""
            return ParseError(f"unknown command /{name}.{hint} Type /help to list the commands.")
        return self._bind(cmd, lexed[1:])

    def _bind(self, cmd: Command, words: list[Lexeme]) -> Invocation | ParseError:
        def fail(msg: str) -> ParseError:
            return ParseError(f"/{cmd.name}: {msg}. Usage: {cmd.usage}")

        args: dict[str, Any] = {}
        before: list[str] = []
        after: list[str] = []
        seen_arrow = False
        i = 0
        while i < len(words):
            w = words[i]
            if w.kind == "arrow":
                if seen_arrow:
                    return fail("'->' appears twice")
                if not any(p.after_arrow for p in cmd.params):
                    return fail("this command takes no '->'")
                seen_arrow = True
            elif w.kind == "word" and w.text.startswith("--") and len(w.text) > 2:
                key, eq, inline = w.text[2:].partition("=")
                param = cmd.param(key)
                if param is None:
                    known = ", ".join(f"--{p.name}" for p in cmd.params if p.kind != "positional")
                    return fail(f"unknown option --{key}" + (f" (options: {known})" if known else ""))
                if param.kind == "flag":
                    if eq:
                        return fail(f"--{key} takes no value")
                    args[param.key] = True
                else:
                    if eq:
                        value = inline
                    elif i + 1 < len(words) and words[i + 1].kind != "arrow":
                        i += 1
                        value = words[i].text
                    else:
                        return fail(f"--{key} needs a value")
                    converted = _convert(param, value)
                    if isinstance(converted, ParseError):
                        return fail(converted.message)
                    args[param.key] = converted
            else:
                (after if seen_arrow else before).append(w.text)
            i += 1

        for side, values in ((False, before), (True, after)):
            params = [p for p in cmd.params if p.kind == "positional" and p.after_arrow == side]
            if side and params and not seen_arrow and any(p.required for p in params):
                return fail("'->' and what follows it are missing")
            for p in params:
                given: str | None
                if p.rest:
                    taken, values = values, []
                    given = " ".join(taken) if taken else None
                else:
                    given = values.pop(0) if values else None
                if given is None:
                    if p.required:
                        return fail(f"{p.label} is missing")
                    args[p.key] = p.default
                    continue
                if not given.strip() and p.required:
                    return fail(f"{p.label} is empty")
                converted = _convert(p, given)
                if isinstance(converted, ParseError):
                    return fail(converted.message)
                args[p.key] = converted
            if values:
                return fail(f"unexpected {' '.join(repr(v) for v in values)}")
        for p in cmd.params:
            if p.kind != "positional" and p.key not in args:
                args[p.key] = False if p.kind == "flag" else p.default
        return Invocation(cmd, args)

    # -- help and completion -------------------------------------------------------------

    def help_rows(self) -> list[tuple[str, str]]:
        return [(c.usage, c.summary) for c in self]

    def help_for(self, name: str) -> str | None:
        cmd = self.get(name.lstrip("/"))
        if cmd is None:
            return None
        lines = [cmd.usage, "", cmd.summary]
        if cmd.details:
            lines += ["", cmd.details]
        if cmd.params:
            lines.append("")
            for p in cmd.params:
                head = p.label if p.kind == "positional" else f"--{p.name}"
                extra = f" (one of: {', '.join(p.choices)})" if p.choices else ""
                lines.append(f"  {head:<14} {p.help}{extra}")
        if cmd.aliases:
            lines += ["", "aliases: " + ", ".join(f"/{a}" for a in cmd.aliases)]
        return "\n".join(lines)

    def complete(self, line: str, session: Any = None) -> list[str]:
        """Candidates for the word being typed at the end of ``line``. Never raises."""
        try:
            return self._complete(line, session)
        except Exception:
            return []

    def _complete(self, line: str, session: Any) -> list[str]:
        if not line.startswith("/"):
            return []
        body = line[1:]
        if not any(ch.isspace() for ch in body):
            return [f"/{n}" for n in self.names() if n.startswith(body)]
        cmd = self.get(body.split(None, 1)[0])
        if cmd is None:
            return []
        ends_in_space = line[-1].isspace()
        lexed = lex(body)
        if isinstance(lexed, ParseError):  # inside an open quote: complete that string
            return []
        words = lexed[1:]
        current = "" if ends_in_space or not words else words[-1].text
        done = words if ends_in_space else words[:-1]
        if done and done[-1].kind == "word" and done[-1].text.startswith("--"):
            param = cmd.param(done[-1].text[2:])
            if param is not None and param.kind == "option":
                return _candidates(param, session, current)
        if current.startswith("-"):
            return [f"--{p.name}" for p in cmd.params if p.kind != "positional" and f"--{p.name}".startswith(current)]
        positionals = [w for w in done if w.kind != "arrow" and not w.text.startswith("--")]
        slots = [p for p in cmd.params if p.kind == "positional"]
        if len(positionals) < len(slots):
            return _candidates(slots[len(positionals)], session, current)
        return []


def _candidates(param: Param, session: Any, prefix: str) -> list[str]:
    if param.choices:
        pool: Iterable[str] = param.choices
    elif param.complete:
        pool = param.complete(session, prefix)
    else:
        return []
    return [c for c in pool if c.startswith(prefix)]


def _convert(param: Param, value: str) -> Any:
    if param.choices and value not in param.choices:
        return ParseError(
            f"{param.label if param.kind == 'positional' else '--' + param.name} "
            f"must be one of {', '.join(param.choices)}, not {value!r}"
        )
    if param.convert is None:
        return value
    try:
        return param.convert(value)
    except (ValueError, TypeError):
        kind = getattr(param.convert, "__name__", "value")
        return ParseError(f"{param.label} must be a {kind}, not {value!r}")


REGISTRY = Registry()
"""The registry every front reads. Commands are added by ``kedit.engine.builtins`` and later modules."""
