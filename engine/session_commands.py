"""The session commands every front shares: /help, /model, /reset, /quit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from kedit.engine import events as ev
from kedit.engine.checks import output_path
from kedit.engine.commands import REGISTRY, Param
from kedit.engine.errors import KeditError
from kedit.engine.model import QUANTS

if TYPE_CHECKING:
    from kedit.engine.session import Session


def _command_names(session: Session | None, prefix: str) -> list[str]:
    return REGISTRY.names()


def _model_names(session: Session | None, prefix: str) -> list[str]:
    aliases = session.config.table("aliases") if session is not None else {}
    return ["fact-world", *sorted(aliases)]


@REGISTRY.command(
    "help",
    "List the commands, or show one command's usage.",
    Param("command", "the command to explain", required=False, complete=_command_names),
    aliases=("h", "?"),
)
def cmd_help(session: Session, command: str | None) -> Iterator[ev.Event]:
    if command:
        text = REGISTRY.help_for(command)
        if text is None:
            yield ev.Error(f"no command /{command.lstrip('/')}; type /help to list them")
        else:
            yield ev.Info(text)
        return
    rows = tuple((usage, summary) for usage, summary in REGISTRY.help_rows())
    yield ev.Table("Commands (anything else is sent to the model)", ("command", "what it does"), rows)


@REGISTRY.command(
    "model",
    "Show the loaded model, or load another (alias, hub id or folder).",
    Param("name", "model to load", required=False, complete=_model_names),
    Param("quant", "bitsandbytes quantization", kind="option", required=False, choices=QUANTS),
    Param("dtype", "weight dtype", kind="option", required=False, choices=("auto", "float32", "bfloat16", "float16")),
    Param("device", "where to run it: auto, cpu, cuda, cuda:N, mps", kind="option", required=False),
    Param("discard", "drop the edits in force (/save keeps them first)", kind="flag"),
)
def cmd_model(
    session: Session, name: str | None, quant: str | None, dtype: str | None, device: str | None, discard: bool
) -> Iterator[ev.Event]:
    if name is None:
        yield ev.Info(session.handle.describe())
        return
    if not name.strip():
        raise KeditError(
            "the model name is empty: give an alias, a hub id or a folder (/model alone shows the loaded one)"
        )
    if session.edits and not discard:
        raise KeditError(
            f"{len(session.edits)} edit(s) are in force and a new model starts without them: "
            "/save FILE keeps them, then /model NAME --discard"
        )
    yield ev.Info(f"loading {name} ...")
    session.switch_model(name, quant=quant, dtype=dtype, device=device)
    yield ev.Info(f"loaded {session.handle.describe()}; the chat was reset")


@REGISTRY.command("reset", "Forget the conversation (the model and its edits stay).")
def cmd_reset(session: Session) -> Iterator[ev.Event]:
    n = len(session.chat)
    session.reset()
    yield ev.Info(f"chat reset ({n} messages forgotten)")


@REGISTRY.command("quit", "Leave kedit.", aliases=("exit", "q"))
def cmd_quit(session: Session) -> Iterator[ev.Event]:
    yield ev.Quit()


@REGISTRY.command(
    "record",
    "Record this session's commands and chat as a recipe that `kedit replay` runs.",
    Param("action", "start or stop", choices=("start", "stop")),
    Param("path", "the recipe to write (with start), e.g. session.toml", required=False, metavar="FILE"),
    Param("force", "overwrite the file if it exists", kind="flag"),
)
def cmd_record(session: Session, action: str, path: str | None, force: bool) -> Iterator[ev.Event]:
    from kedit.engine.recipes import Recorder

    if action == "start":
        if session.recorder is not None:
            raise KeditError(f"already recording to {session.recorder.path}; /record stop first")
        if not path:
            raise KeditError("say where the recipe goes: /record start FILE.toml")
        target = output_path(path, "the recipe file")
        if target.exists() and not force:
            raise KeditError(f"{path} exists: /record start {path} --force overwrites it when recording stops")
        if session.edits or session.steering.slots:
            raise KeditError(
                "a recipe starts from the model as loaded: /undo the edits and /steer remove "
                "the vectors first, or save the session with /save"
            )
        session.recorder = Recorder(target, session.handle.name)
        session.reset()
        yield ev.Info(f"recording to {path} (the chat was reset); /record stop writes it")
        return
    if session.recorder is None:
        raise KeditError("not recording; /record start FILE.toml begins")
    recorder = session.recorder
    if path:
        recorder.path = output_path(path, "the recipe file")
    try:
        written = recorder.write()
    except OSError as exc:
        raise KeditError(
            f"could not write {recorder.path} ({exc.strerror or exc}); still recording: "
            "/record stop OTHER.toml writes it elsewhere"
        ) from None
    session.recorder = None
    yield ev.Info(f"wrote {len(recorder.steps)} step(s) to {written}; kedit replay {written} runs them")
