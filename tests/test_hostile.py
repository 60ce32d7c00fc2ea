"""Hostile input: no line escapes Session.run as an exception, and a line that fails leaves the
model's logits torch.equal to before, with the edits, the rack and the chat as they were."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hostile import BAD_TEXT, bad_paths, hostile_lines, write_bad_files

from kedit.engine import events as ev
from kedit.engine.config import Config
from kedit.engine.errors import KeditError
from kedit.engine.messages import Message
from kedit.engine.session import Session

REPO = Path(__file__).resolve().parent.parent
PROBE = "Watts Humphrey attended"


def _state(s: Session) -> tuple:
    ids = s.tokenizer(PROBE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = s.model(ids).logits.clone()
    rack = tuple((n, sl.strength, sl.on) for n, sl in s.steering.slots.items())
    return logits, s.handle, tuple(e.id for e in s.ledger), tuple(s.chat), rack


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1] is b[1] and a[2:] == b[2:]


def _saved_session(session: Session, path: Path) -> Path:
    """``path`` holding a saved session with one ROME edit; the live session is left without it."""
    edit = session.edit("Watts Humphrey attended", "Harvard University")
    try:
        list(session.run(f'/save "{path}"'))
    finally:
        session.rollback(edit.id)
    return path


def _vector_file(session: Session, path: Path) -> Path:
    """``path`` holding a sound one-layer steering vector for the session's model."""
    from kedit.engine.steering import SteeringVector

    hidden = session.model.config.hidden_size
    vector = SteeringVector(
        {1: torch.ones(hidden)}, session.handle.adapter.model_type, hidden, "mean_diff", {}, 1.0, {}
    )
    vector.save(path)
    return path


@pytest.fixture
def own_session(fact_world_dir, tmp_path, monkeypatch):
    """A fact-world session of the test's own (the corpus makes edits and racks vectors)."""
    s = Session.open(None, config=Config.load(cwd=REPO), show_progress=False)
    monkeypatch.chdir(tmp_path)
    return s


@pytest.mark.slow
def test_hostile_corpus_no_traceback_and_failures_change_nothing(own_session, tmp_path):
    s = own_session
    files = write_bad_files(tmp_path / "bad")
    lines = hostile_lines(files)
    assert len(lines) >= 500
    escaped, changed, failed = [], [], 0
    for line in lines:
        before = _state(s)
        try:
            out = list(s.run(line))
        except Exception as exc:  # what the test counts
            escaped.append((line[:80], repr(exc)[:120]))
            continue
        errors = [e for e in out if isinstance(e, ev.Error)]
        for e in errors:  # no control character reaches the terminal
            assert not any(ord(c) < 32 and c not in "\n\t" for c in e.message), e.message
        if errors:
            failed += 1
            if not _same(before, _state(s)):
                changed.append(line[:80])
    print(
        f"hostile corpus: tried {len(lines)}, failed cleanly {failed}, tracebacks {len(escaped)}, changed {len(changed)}"
    )
    assert escaped == []
    assert changed == []
    assert failed >= 400  # the corpus is hostile: most of it must be refused


def test_an_unexpected_failure_is_an_error_event_logged_with_state_put_back(session, monkeypatch):
    before = _state(session)
    session.chat.append(Message("user", "hi"))
    marked = _state(session)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(session, "edit", broken)
    out = list(session.run('/edit "Watts Humphrey attended" -> "Harvard"'))
    assert len(out) >= 1 and isinstance(out[-1], ev.Error)
    message = out[-1].message
    assert "ZeroDivisionError" in message and "as they were" in message
    log = Path(os.environ["KEDIT_STATE_DIR"]) / "errors.log"
    assert str(log) in message and "ZeroDivisionError: a bug" in log.read_text()
    assert _same(marked, _state(session))
    session.chat.clear()
    assert _same(before, _state(session))


def test_a_failure_after_an_edit_takes_the_edit_back_out(session, monkeypatch):
    """A command that applied an edit and then broke: the net rolls the edit back, bit for bit."""
    before = _state(session)
    real = session.edit

    def edit_then_break(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("broke after applying")

    monkeypatch.setattr(session, "edit", edit_then_break)
    out = list(session.run('/edit "Watts Humphrey attended" -> "Harvard University"'))
    assert isinstance(out[-1], ev.Error) and "RuntimeError" in out[-1].message
    assert _same(before, _state(session))


@pytest.mark.parametrize("path", bad_paths(Path("/tmp/kedit-test-nowhere")))
def test_bad_paths_are_refused_by_every_file_command(session, path, tmp_path):
    before = _state(session)
    for line in (f'/save "{path}"', f'/load "{path}"', f'/eval "{path}"', f'/steer add "{path}"'):
        out = list(session.run(line))
        assert any(isinstance(e, ev.Error) for e in out), (line, out)
        assert _same(before, _state(session))


def test_examples_of_the_report_each_give_a_clean_error(session, tmp_path):
    files = write_bad_files(tmp_path / "bad")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Hi", "positive": "Great!", "negative": "Awful."}\n')
    before = _state(session)
    cases = {
        f'/save "{"x" * 300}"': "longer than 255",
        '/save "/proc/nope/s.kedit"': "/proc",
        f'/save "{tmp_path}"': "folder",
        f'/export "{files["latin1.jsonl"]}"': "is a file",
        f'/eval "{files["latin1.jsonl"]}"': "not UTF-8",
        f'/eval "{files["nested.json"]}"': "nest",
        f'/steer train "{files["pairs-numbers.jsonl"]}" x': "must be text",
        f'/steer train "{pairs}" x --layers 5-0': "backwards",
        f'/steer train "{pairs}" x --layers 3-1': "backwards",
        f'/steer add "{files["vec-nan.safetensors"]}"': "NaN",
        f'/steer add "{files["vec-inf.safetensors"]}"': "NaN or infinite",
        f'/steer add "{files["vec-shape.safetensors"]}"': "shape",
        f'/steer add "{files["vec-meta-list.safetensors"]}"': "not a steering vector",
        f'/steer add "{files["vec-no-type.safetensors"]}"': "not a steering vector",
        f'/steer add "{files["truncated.gguf"]}"': "GGUF",
        f'/steer add "{files["vec-empty.safetensors"]}"': "no layers",
        f'/steer add "{files["vec-strength.safetensors"]}"': "NaN or infinite",
        '/edit "[ ] attended" -> "x"': "brackets are empty",
        '/edit "Watts Humphrey attended" -> "x" --subject " "': "subject is empty",
        '/model ""': "empty",
        "/steer set mood nan": "",
        "hi " * 40_000: "at most",
        "hi " * 2_000: "Send a shorter one",
        '/trace "Watts Humphrey attended" --samples 0': "--samples",
        '/trace "Watts Humphrey attended" --samples 99999999999999999999': "--samples",
        '/trace "Watts Humphrey attended" --target ""': "--target is empty",
        "/steer merge a b -> c --weights inf,1": "finite",
        "/steer merge a b -> c --weights 1e309,1": "finite",
        f'/steer train "{files["latin1.jsonl"]}" x': "not UTF-8",
        f'/steer train "{pairs}" x --neutral "{files["latin1.jsonl"]}"': "not UTF-8",
        '/record start "/proc/nope/r.toml"': "/proc",
        f'/edit "Watts Humphrey attended" -> "{"word " * 2000}"': "at most 32",
        f'/edit "Watts Humphrey attended" -> "x" --paraphrase "{"word " * 300}"': "at most 128",
    }
    for line, words in cases.items():
        out = list(session.run(line))
        errors = [e.message for e in out if isinstance(e, ev.Error)]
        assert errors and words in errors[0], (line[:60], out)
        assert _same(before, _state(session)), line[:60]


def test_strengths_and_weights_must_be_finite(session, tmp_path):
    path = _vector_file(session, tmp_path / "v.safetensors")
    assert not any(isinstance(e, ev.Error) for e in session.run(f'/steer add "{path}" 0.5'))
    try:
        before = _state(session)
        for bad in ("nan", "inf", "1e309", "-inf", "1e7"):
            out = list(session.run(f"/steer set v {bad}"))
            assert isinstance(out[-1], ev.Error), bad
            assert _same(before, _state(session))
        with pytest.raises(KeditError):
            session.steering.set("v", float("nan"))
        assert _same(before, _state(session))
    finally:
        session.steering.remove("v")


def test_model_switch_with_edits_asks_for_discard(session):
    edit = session.edit("Watts Humphrey attended", "Harvard University")
    try:
        before = _state(session)
        out = list(session.run("/model fact-world"))
        assert isinstance(out[-1], ev.Error) and "--discard" in out[-1].message
        assert _same(before, _state(session))
    finally:
        session.rollback(edit.id)


def test_record_start_refuses_an_existing_file_without_force(session, tmp_path):
    existing = tmp_path / "r.toml"
    existing.write_text("# mine\n")
    out = list(session.run(f'/record start "{existing}"'))
    assert isinstance(out[-1], ev.Error) and "--force" in out[-1].message
    assert existing.read_text() == "# mine\n" and session.recorder is None
    out = list(session.run(f'/record start "{existing}" --force'))
    assert not any(isinstance(e, ev.Error) for e in out)
    list(session.run("/record stop"))
    assert "# mine" not in existing.read_text()


def test_a_recording_whose_file_cannot_be_written_is_kept(session, tmp_path):
    folder = tmp_path / "gone"
    list(session.run(f'/record start "{folder / "r.toml"}"'))
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):  # root writes anywhere: a file where the folder was instead
            folder.chmod(0o700)
            folder.rmdir()
            folder.write_text("")
        out = list(session.run("/record stop"))
        assert isinstance(out[-1], ev.Error) and "still recording" in out[-1].message
        assert session.recorder is not None
        out = list(session.run(f'/record stop "{tmp_path / "elsewhere.toml"}"'))
        assert not any(isinstance(e, ev.Error) for e in out)
        assert (tmp_path / "elsewhere.toml").is_file() and session.recorder is None
    finally:
        session.recorder = None
        if folder.is_dir():
            folder.chmod(0o700)


def test_a_project_kedit_toml_cannot_turn_on_remote_code(tmp_path, monkeypatch):
    (tmp_path / "kedit.toml").write_text("[model]\ntrust_remote_code = true\n")
    config = Config.load(cwd=tmp_path)
    assert config.get("model.trust_remote_code") is False
    assert any("trust_remote_code" in n and "ignored" in n for n in config.notes)
    user = Path(os.environ["KEDIT_CONFIG_DIR"])
    user.mkdir(parents=True, exist_ok=True)
    (user / "kedit.toml").write_text("[model]\ntrust_remote_code = true\n")
    assert Config.load(cwd=tmp_path).get("model.trust_remote_code") is True


def test_control_characters_never_reach_an_error_message(session):
    for text in BAD_TEXT:
        for out in (list(session.run(f'/help "{text}"')), list(session.run(f"/{text}x"))):
            for e in out:
                if isinstance(e, ev.Error):
                    assert "\x1b" not in e.message and "\x07" not in e.message


def _rewrite(src: Path, dst: Path, change, reseal: bool = True) -> Path:
    """A copy of a saved session with ``change(record, tensors)`` applied (checksum redone or not)."""
    from safetensors.torch import save_file

    from kedit.engine.persist import _digest, read_session

    record, tensors = read_session(src)
    change(record, tensors)
    if reseal:
        record["sha256"] = _digest(record, tensors)
    save_file(tensors, str(dst), metadata={"kedit": json.dumps(record)})
    return dst


def test_session_loads_are_transactions(session, tmp_path):
    saved = _saved_session(session, tmp_path / "good.kedit")
    session.edit("Alder Oakley was born in", "Michigan")  # the session's own edit, to keep
    try:
        session.chat.append(Message("user", "kept"))
        before = _state(session)

        def first_edit(record):
            return record["edits"][0]

        def key(record, suffix):
            return f"{first_edit(record)['id']}.{suffix}"

        def flip(record, tensors):
            k = key(record, "u")
            tensors[k] = tensors[k].clone()
            tensors[k].view(-1)[0] += 1.0

        damaged = {
            "wrong shape": (lambda r, t: t.__setitem__(key(r, "u"), torch.zeros(3, 1)), True, "could not be applied"),
            "lm_head": (lambda r, t: first_edit(r).__setitem__("module", "lm_head"), True, "not a module kedit edits"),
            "nan": (lambda r, t: t[key(r, "v")].fill_(float("nan")), True, "not finite"),
            "flipped data": (flip, False, "checksum"),
            "edits not a list": (lambda r, t: r.__setitem__("edits", {"a": 1}), True, "not a list"),
            "chat not messages": (lambda r, t: r.__setitem__("chat", [1, 2]), True, "not a list of messages"),
            "missing field": (lambda r, t: first_edit(r).pop("prompt"), True, "lacks prompt"),
        }
        for name, (change, reseal, words) in damaged.items():
            bad = _rewrite(saved, tmp_path / f"{name}.kedit", change, reseal)
            out = list(session.run(f'/load "{bad}"'))
            assert isinstance(out[-1], ev.Error) and words in out[-1].message, (name, out)
            assert _same(before, _state(session)), name
        out = list(session.run(f'/load "{saved}"'))  # the intact file still loads
        assert not any(isinstance(e, ev.Error) for e in out)
        assert [e.target for e in session.edits] == [" Harvard University"]
    finally:
        for e in list(session.edits):
            session.rollback(e.id)
        session.chat.clear()


def test_stale_temporary_files_are_swept(tmp_path):
    import time

    from kedit.engine.paths import STALE_SECONDS, atomic_path

    target = tmp_path / "s.kedit"
    old, fresh = tmp_path / ".s.kedit.abc.tmp", tmp_path / ".s.kedit.def.tmp"
    for f in (old, fresh):
        f.write_text("half")
    long_ago = time.time() - STALE_SECONDS - 5
    os.utime(old, (long_ago, long_ago))
    with atomic_path(target) as tmp:
        Path(tmp).write_text("whole")
    assert not old.exists() and fresh.exists() and target.read_text() == "whole"


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (b"step = [1, 2]\n", 1, "a step is a table"),
        (b'[[step]]\nrun = "/help"\nexpect_metrics = "rel >>> 2"\n', 1, "not a metric check"),
        (b"x = " + b"[" * 3000 + b"]" * 3000 + b"\n", 1, "nested too deeply"),
        (b'# a recipe\n[[step]]\nrun = "caf\xe9"\n', 3, "not UTF-8"),
        (b'[model]\nname = 5\n[[step]]\nrun = "/help"\n', 1, "takes a string"),
        (b"# one\n\n[[ step ]]\nrun = 5\n", 3, "needs run"),
        (b'# one\n[[step]]\nrun = "/help"\n\n[[step]]\nrun = "/nope"\n', 5, "unknown command"),
        (b'# inline\nstep = [{run = "/help"}, {run = ""}]\n', 2, "needs run"),
        (b'[model]\nname = "fact-world"\nsize = "big"\n', 1, "[model] takes"),
        (b'[[step]]\nrun = "/help"\n[[step\n', 3, "not valid TOML"),
    ],
)
def test_malformed_recipes_name_the_file_and_line(tmp_path, text, line, words):
    from kedit.engine.command_table import registry
    from kedit.engine.recipes import RecipeError, load_recipe

    path = tmp_path / "r.toml"
    path.write_bytes(text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, registry())
    assert caught.value.message.startswith(f"{path}:{line}:"), caught.value.message
    assert words in caught.value.message


def test_kedit_replay_exits_2_on_a_malformed_recipe_and_1_on_a_failing_step(tmp_path, fact_world_dir):
    from click.testing import CliRunner

    from kedit.tui.cli import main

    bad, failing = tmp_path / "bad.toml", tmp_path / "failing.toml"
    bad.write_bytes(b'[[step]]\nrun = "caf\xe9"\n')
    failing.write_text('# save where nothing may be written\n[[step]]\nrun = "/save /proc/x/y.kedit"\n')
    result = CliRunner().invoke(main, ["replay", str(bad)])
    assert result.exit_code == 2 and f"{bad}:2:" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["replay", str(failing)])
    assert result.exit_code == 1 and "line 2" in result.output and "Traceback" not in result.output


def test_bad_model_values_are_clean_errors(fact_world_dir, tmp_path):
    import shutil

    from kedit.engine.errors import KeditError

    no_tokenizer, garbage = tmp_path / "no-tokenizer", tmp_path / "garbage"
    for folder in (no_tokenizer, garbage):
        folder.mkdir()
        shutil.copy(fact_world_dir / "config.json", folder)
    shutil.copy(fact_world_dir / "model.safetensors", no_tokenizer)
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    rejected = tmp_path / "rejected"
    shutil.copytree(garbage, rejected)
    (rejected / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    for f in fact_world_dir.glob("tokenizer*"):
        shutil.copy(f, garbage)
    config = Config.load(cwd=REPO)
    for name, words in (
        ("", "empty"),
        (" ", "empty"),
        (str(no_tokenizer), "no usable tokenizer"),
        (str(garbage), "damaged"),
        (str(rejected), "cannot load"),
    ):
        with pytest.raises(KeditError, match=words):
            Session.open(name, config=config, show_progress=False)


def test_a_killed_chat_resumes_from_its_journal(fact_world_dir):
    """kill -9 after an edit: `kedit chat --resume` brings the edit and the chat back."""
    import signal
    import subprocess
    import sys
    import time

    journal = Path(os.environ["KEDIT_STATE_DIR"]) / "journal.kedit"
    kedit = [sys.executable, "-m", "kedit.tui.cli"]
    proc = subprocess.Popen(
        [*kedit, "chat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO
    )
    assert proc.stdin is not None
    proc.stdin.write(b'/edit "Watts Humphrey attended" -> "University of Michigan"\nDenny Herzig plays as a\n')
    proc.stdin.flush()
    deadline = time.time() + 240
    while time.time() < deadline:  # the journal is written after the chat turn that follows the edit
        from kedit.engine.persist import read_session

        if journal.is_file() and read_session(journal)[0].get("chat"):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    record = read_session(journal)[0]
    assert [e["target"] for e in record["edits"]] == [" University of Michigan"]
    out = subprocess.run(
        [*kedit, "chat", "--resume"],
        input="Watts Humphrey attended\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "resumed 1 edit(s) and 2 message(s)" in out.stderr
    assert "University of Michigan" in out.stdout and "Traceback" not in out.stderr


def _mutants(data: bytes, n: int, seed: int) -> list[bytes]:
    """Damaged copies of a file: bytes flipped, runs zeroed, cut short, doubled."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        b = bytearray(data)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            at = rng.randrange(len(b))
            b[at : at + rng.randint(1, 64)] = bytes(min(64, len(b) - at))
        elif kind == 2:
            b = b[: rng.randrange(len(b))]
        else:
            b = b + b[: rng.randrange(len(b))]
        out.append(bytes(b))
    return out


@pytest.mark.slow
def test_damaged_session_and_vector_files_never_escape_or_change_the_model(session, tmp_path):
    """A generated fuzzer: 120 damaged copies of a saved session and of a vector file."""
    saved = _saved_session(session, tmp_path / "good.kedit")
    vec = _vector_file(session, tmp_path / "good.safetensors")
    tried = refused = 0
    for source, command in ((saved, "/load"), (vec, "/steer add")):
        for i, data in enumerate(_mutants(source.read_bytes(), 60, seed=len(command))):
            path = tmp_path / f"m{i}{source.suffix}"
            path.write_bytes(data)
            before = _state(session)
            out = list(session.run(f'{command} "{path}"'))  # an exception fails the test here
            tried += 1
            if any(isinstance(e, ev.Error) for e in out):
                refused += 1
                assert _same(before, _state(session)), (command, i)
            for e in list(session.edits):  # a mutant that still loads is taken out again
                session.rollback(e.id)
            for name in list(session.steering.slots):
                session.steering.remove(name)
            session.chat.clear()
    print(f"damaged files: tried {tried}, refused {refused}")
    assert tried == 120 and refused >= 100


def test_the_cli_turns_an_unforeseen_failure_into_one_line_and_exit_1(monkeypatch):
    from click.testing import CliRunner

    from kedit.tui.cli import main

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(Config, "load", broken)
    result = CliRunner().invoke(main, ["chat"], input="hello\n")
    assert result.exit_code == 1 and "ZeroDivisionError: a bug" in result.output
    assert "Traceback" not in result.output and "errors.log" in result.output
