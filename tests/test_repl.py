"""The interactive REPL, driven through prompt-toolkit's pipe input as a terminal would."""

from __future__ import annotations

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from kedit.engine.paths import data_dir
from kedit.tui.repl import RegistryCompleter, run_interactive


def _drive(session, keys: str) -> int:
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        pipe.send_text(keys)
        return run_interactive(session)


def test_interactive_chat_streams_and_keeps_history(session, capsys: pytest.CaptureFixture[str]) -> None:
    assert _drive(session, "Watts Humphrey attended\r/quit\r") == 0
    out = capsys.readouterr().out
    assert "Watts Humphrey attended Illinois Institute of Technology." in out
    history = (data_dir() / "history").read_text()
    assert "Watts Humphrey attended" in history and "/quit" in history


def test_alt_enter_and_ctrl_j_add_lines_instead_of_sending(session) -> None:
    _drive(session, "first\x1b\rsecond\nthird\r/quit\r")  # alt+enter, ctrl+j, enter
    assert session.chat[0].content == "first\nsecond\nthird"


def test_ctrl_d_leaves_and_ctrl_c_at_the_prompt_does_not(session) -> None:
    assert _drive(session, "half a line\x03\x04") == 0  # ctrl-c clears the line, ctrl-d quits
    assert session.chat == []


def test_completion_comes_from_the_registry(session) -> None:
    completer = RegistryCompleter(session)

    def complete(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), None)]

    assert complete("/he") == ["/help"]
    assert complete("/help mo") == ["model"]
    assert complete("/model --quant ") == ["4bit", "8bit"]
    assert "fact-world" in complete("/model ")
    assert complete("Watts") == []
