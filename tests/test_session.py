"""Session: chat turns, slash commands as events, streaming, stop, and the model lock."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from tiny_models import make_tiny_with_tokenizer

from kedit.engine import events as ev
from kedit.engine.config import Config
from kedit.engine.session import Session


@pytest.fixture(scope="module")
def tiny_session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    """A base (no chat template) random-weight Llama that rambles on: good for stopping."""
    folder = make_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny") / "llama", seed=3)
    cfg = Config.load(env={}).with_overrides({"generation.max_new_tokens": 300})
    return Session.open(str(folder), config=cfg, show_progress=False)


def _collect(events) -> list[ev.Event]:
    return list(events)


def test_chat_turn_recalls_a_fact(session: Session) -> None:
    out = _collect(session.run("Watts Humphrey attended"))
    tokens = [e for e in out if isinstance(e, ev.Token)]
    reply = out[-1]
    assert isinstance(reply, ev.Reply) and not reply.stopped
    assert "Illinois Institute of Technology" in reply.text
    assert "".join(t.text for t in tokens) == reply.text and len(tokens) >= 2
    assert [m.role for m in session.chat] == ["user", "assistant"]
    assert session.chat[1].content == reply.text.strip()


def test_questions_use_the_chat_template(session: Session) -> None:
    reply = _collect(session.run("Which family does Ramalinaceae belong to?"))[-1]
    assert isinstance(reply, ev.Reply) and "Lecanorales" in reply.text


def test_commands_are_events(session: Session) -> None:
    _collect(session.run("Denny Herzig plays as a"))
    assert len(session.chat) == 2
    (reset,) = _collect(session.run("/reset"))
    assert isinstance(reset, ev.Info) and "2 messages" in reset.text and session.chat == []
    (table,) = _collect(session.run("/help"))
    assert isinstance(table, ev.Table)
    assert {row[0].split()[0] for row in table.rows} >= {"/help", "/model", "/reset", "/quit"}
    (info,) = _collect(session.run("/help model"))
    assert isinstance(info, ev.Info) and info.text.startswith("/model")
    (model,) = _collect(session.run("/model"))
    assert isinstance(model, ev.Info) and "fact-world" in model.text and "Qwen2" in model.text
    assert isinstance(_collect(session.run("/quit"))[0], ev.Quit)


def test_bad_commands_are_error_events_and_change_nothing(session: Session) -> None:
    ids = session.tokenizer("Watts Humphrey attended", return_tensors="pt")["input_ids"]
    before = session.model(ids).logits
    for line in ("/nope", '/help "unclosed', "/model --quant 3bit", "/reset extra words", "/model /no/such/folder"):
        out = _collect(session.run(line))
        assert len(out) >= 1 and isinstance(out[-1], ev.Error), line
        assert out[-1].message
    assert session.handle.name == "fact-world"
    assert torch.equal(session.model(ids).logits, before)


def test_double_slash_sends_a_literal_slash_as_chat(session: Session) -> None:
    out = _collect(session.run("//help"))
    assert isinstance(out[-1], ev.Reply) and session.chat[0].content == "/help"


def test_base_models_complete_plain_text(tiny_session: Session) -> None:
    assert not tiny_session.handle.is_chat
    reply = _collect(tiny_session.run("hello"))[-1]
    assert isinstance(reply, ev.Reply) and reply.tokens > 50  # it rambles: no EOS soon
    assert tiny_session.chat == []  # no conversation for a base model


def test_stop_from_another_thread_ends_generation(tiny_session: Session) -> None:
    full = _collect(tiny_session.run("hello"))[-1]
    pieces = 0
    stopped = None
    for event in tiny_session.run("hello"):
        if isinstance(event, ev.Token):
            pieces += 1
            if pieces == 3:
                t = threading.Thread(target=tiny_session.stop)
                t.start()
                t.join()
        elif isinstance(event, ev.Reply):
            stopped = event
    assert stopped is not None and stopped.stopped
    assert stopped.tokens < full.tokens / 2
    assert full.text.startswith(stopped.text)  # greedy: the same reply, cut short
    assert not tiny_session.generating


def test_leaving_the_stream_early_stops_cleanly(tiny_session: Session) -> None:
    stream = tiny_session.stream("hello")
    next(stream)
    stream.close()  # what a front does when it breaks out of the loop
    assert not tiny_session.generating
    assert [t.name for t in threading.enumerate() if t.name == "kedit-generate"] == []
    assert tiny_session.lock.acquire(blocking=False)
    tiny_session.lock.release()


def test_the_lock_is_held_for_a_whole_generation(tiny_session: Session) -> None:
    started, release = threading.Event(), threading.Event()
    holder_saw: list[bool] = []

    def consume() -> None:
        for i, _ in enumerate(tiny_session.stream("hello")):
            if i == 1:
                started.set()
                release.wait(10)
                tiny_session.stop()

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(30)
    holder_saw.append(tiny_session.lock.acquire(blocking=False))  # another thread: refused
    release.set()
    t.join(30)
    assert holder_saw == [False]
    assert tiny_session.lock.acquire(timeout=5)
    tiny_session.lock.release()


class _CtrlC:
    """Iterates engine events and delivers one ctrl-c after a few tokens.

    ``inside`` puts the interrupt inside the engine's generator frame (where a real one
    usually lands, blocked on the next token); otherwise it lands in the front's frame.
    """

    def __init__(self, events, inside: bool) -> None:
        self.events, self.inside, self.count = events, inside, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        if self.count == 5:
            if self.inside:
                self.events.throw(KeyboardInterrupt)
            raise KeyboardInterrupt
        return next(self.events)


@pytest.mark.parametrize("inside", [True, False])
def test_ctrl_c_in_the_repl_stops_the_reply_not_the_program(tiny_session: Session, inside: bool) -> None:
    from kedit.tui.repl import render

    full = _collect(tiny_session.run("hello"))[-1]
    out, err = io.StringIO(), io.StringIO()
    assert render(_CtrlC(tiny_session.run("hello"), inside), tiny_session, out, err) is True
    assert not tiny_session.generating
    text = out.getvalue()
    assert text.endswith(" [stopped]\n") and text.count("[stopped]") == 1
    assert len(text) < len(full.text) / 2
    assert full.text.startswith(text.removesuffix(" [stopped]\n"))
    # the session still answers afterwards, from another thread too (the lock was released)
    result: list[ev.Event] = []
    t = threading.Thread(target=lambda: result.extend(tiny_session.run("hello")))
    t.start()
    t.join(60)
    assert isinstance(result[-1], ev.Reply) and result[-1].text == full.text


def test_a_failed_generation_is_an_error_event_and_keeps_the_chat(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    _collect(session.run("Denny Herzig plays as a"))
    before = [(m.role, m.content) for m in session.chat]

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(session.model, "generate", broken)
    out = _collect(session.run("Watts Humphrey attended"))
    assert isinstance(out[-1], ev.Error) and "simulated kernel failure" in out[-1].message
    assert [(m.role, m.content) for m in session.chat] == before
    assert not session.generating


def test_long_chats_keep_to_the_context_window(session: Session) -> None:
    limit = session.model.config.max_position_embeddings
    for _ in range(12):  # far more text than the window holds
        _collect(session.run("Watts Humphrey attended " + "and so on " * 8))
    reply = _collect(session.run("Watts Humphrey attended"))[-1]
    assert isinstance(reply, ev.Reply) and reply.tokens > 0
    budget = limit - session.config.get("generation.max_new_tokens")
    assert session._prompt_ids("").shape[1] <= budget
    full = session.tokenizer.apply_chat_template([m.as_dict() for m in session.chat], tokenize=False)
    assert len(session.tokenizer(full, add_special_tokens=False)["input_ids"]) > limit  # it did trim
    assert len(session.chat) == 26  # the conversation itself is kept whole
