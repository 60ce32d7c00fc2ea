"""``kedit chat``: a prompt-toolkit REPL over the engine Session.

On a terminal: streaming replies, a history file, completion from the command
registry, multiline input (alt+enter or ctrl+j add a line; enter sends), and
ctrl-c stops the current generation rather than the program. With stdin not a
terminal, it reads one line per turn and prints the replies, for scripts.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings

from kedit.engine import events as ev
from kedit.engine.errors import KeditError
from kedit.engine.paths import data_dir
from kedit.engine.persist import Journal
from kedit.engine.session import Session


def render(events: Iterable[ev.Event], session: Session, out: TextIO, err: TextIO) -> bool:
    """Print events as they come; ctrl-c stops a generation. Returns False on /quit."""
    stream = iter(events)
    streaming = interrupted = progress_shown = False
    while True:
        try:
            event = next(stream)
        except StopIteration:
            break
        except KeyboardInterrupt:
            # Landing in the engine's frame ends its generator (which stops generation);
            # landing here leaves it running: stop it and drain to its Reply.
            session.stop()
            interrupted = True
            continue
        if isinstance(event, ev.Progress):
            if err.isatty():  # one self-overwriting line; scripts get none of it
                err.write(f"\r\033[K{event.label}: {event.done}/{event.total}")
                err.flush()
                progress_shown = True
            continue
        if progress_shown:
            err.write("\r\033[K")
            progress_shown = False
        if isinstance(event, ev.Token):
            out.write(event.text)
            out.flush()
            streaming = True
        elif isinstance(event, ev.Reply):
            note = " [stopped]" if event.stopped else ""
            out.write(("" if streaming else event.text) + note + "\n")
            out.flush()
            streaming = interrupted = False
        elif isinstance(event, ev.Quit):
            return False
        else:
            text = ev.event_text(event)
            if text is not None:
                target = err if isinstance(event, ev.Error) else out
                target.write(text + "\n")
                target.flush()
    if interrupted:
        out.write(" [stopped]\n")
        out.flush()
    return True


def piped_lines(stdin: TextIO) -> Iterator[str]:
    for raw in stdin:
        line = raw.rstrip("\n")
        if line.strip():
            yield line


def _journal(journal: Journal | None, err: TextIO) -> None:
    problem = journal.note() if journal is not None else None
    if problem:
        print(f"warning: {problem}", file=err)


def run_piped(session: Session, stdin: TextIO, out: TextIO, err: TextIO, journal: Journal | None = None) -> int:
    """Scripted use: one input line per turn, replies to stdout, errors to stderr."""
    for line in piped_lines(stdin):
        going = render(session.run(line), session, out, err)
        _journal(journal, err)
        if not going:
            break
    return 0


class RegistryCompleter(Completer):
    """prompt-toolkit completion backed by the engine's command registry."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get_completions(self, document: Document, complete_event: object) -> Iterator[Completion]:
        line = document.text_before_cursor
        current = "" if line[-1:].isspace() else document.get_word_before_cursor(WORD=True)
        for candidate in self.session.registry.complete(line, self.session):
            yield Completion(candidate, start_position=-len(current))


def run_interactive(session: Session, journal: Journal | None = None) -> int:
    """The terminal REPL."""
    history = data_dir() / "history"
    history.parent.mkdir(parents=True, exist_ok=True)
    keys = KeyBindings()

    @keys.add("escape", "enter")
    @keys.add("c-j")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    prompt = PromptSession(
        history=FileHistory(str(history)),
        completer=RegistryCompleter(session),
        complete_while_typing=True,
        key_bindings=keys,
        multiline=False,
    )
    print(f"kedit · {session.handle.describe()}")
    print("Type to chat, /help for commands, ctrl-c stops a reply, ctrl-d quits.")
    while True:
        try:
            line = prompt.prompt("› ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            return 0
        if not line.strip():
            continue
        going = render(session.run(line), session, sys.stdout, sys.stderr)
        _journal(journal, sys.stderr)
        if not going:
            return 0


def main(session: Session, resume: bool = False) -> int:
    """Run the REPL (or piped turns) with the session journalled; ``resume`` first loads the
    journal a crashed or killed kedit left."""
    journal = Journal(session)
    if resume:
        try:
            print(journal.resume(), file=sys.stderr)
        except KeditError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
    if sys.stdin.isatty() and sys.stdout.isatty():
        return run_interactive(session, journal)
    return run_piped(session, sys.stdin, sys.stdout, sys.stderr, journal)
