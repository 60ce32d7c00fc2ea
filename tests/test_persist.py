"""Sessions on disk: a saved session reloads into an identical model; a killed save loses nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kedit.engine.errors import KeditError
from kedit.engine.persist import load_session, read_session, save_session


def _logits(session, text: str = "Watts Humphrey attended") -> torch.Tensor:
    ids = session.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return session.model(ids).logits


def test_saved_session_reloads_into_an_identical_model(session, tmp_path: Path) -> None:
    original = _logits(session)
    a = session.edit("Watts Humphrey attended", "University of Michigan", layer=0, identity_c=True)
    b = session.edit("Denny Herzig plays as a", "goalkeeper", layer=1, identity_c=True)
    list(session.run("Where was Denny Herzig born?"))
    edited = _logits(session)
    chat = [(m.role, m.content) for m in session.chat]
    path = save_session(session, tmp_path / "s.kedit")
    session.rollback(a.id)
    session.rollback(b.id)
    session.reset()
    assert torch.equal(_logits(session), original)

    loaded = load_session(session, path)
    try:
        assert [e.id for e in loaded] == [a.id, b.id]
        assert torch.equal(_logits(session), edited)
        # and the keys later edits keep (ROME's keep_earlier) come back with them
        assert all(torch.equal(x.patch.keys, y.patch.keys) for x, y in zip(loaded, [a, b]))
        assert [(m.role, m.content) for m in session.chat] == chat
        assert loaded[0].probe.as_dict() == a.probe.as_dict()
        assert int(session.ledger.next_id()[1:]) > int(b.id[1:])  # ids are not reused after a load
    finally:
        for e in list(session.edits):
            session.rollback(e.id)
    assert torch.equal(_logits(session), original)


def test_a_save_killed_half_way_leaves_the_previous_file(
    session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch as st

    path = tmp_path / "s.kedit"
    e = session.edit("Watts Humphrey attended", "University of Michigan", layer=0, identity_c=True)
    try:
        save_session(session, path)
        good = path.read_bytes()
        real_save = st.save_file

        def killed(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata)
            Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # half written
            raise KeyboardInterrupt  # the process is interrupted mid-save

        monkeypatch.setattr(st, "save_file", killed)
        session.edit("Denny Herzig plays as a", "goalkeeper", layer=1, identity_c=True)
        with pytest.raises(KeyboardInterrupt):
            save_session(session, path)
        assert path.read_bytes() == good
        assert [p.name for p in tmp_path.iterdir()] == ["s.kedit"]  # no temporary left over
        record, _ = read_session(path)
        assert [x["id"] for x in record["edits"]] == [e.id]
    finally:
        for x in list(session.edits):
            session.rollback(x.id)


def test_bad_files_are_refused(session, tmp_path: Path) -> None:
    (tmp_path / "junk.kedit").write_bytes(b"not a session")
    for path, message in [
        (tmp_path / "missing.kedit", "no saved session"),
        (tmp_path / "junk.kedit", "not a kedit session"),
    ]:
        with pytest.raises(KeditError, match=message):
            load_session(session, path)
    with pytest.raises(KeditError, match="is a folder"):
        save_session(session, tmp_path)


def test_grace_wise_and_rome_edits_save_and_reload_exactly(session, tmp_path: Path) -> None:
    prompts = ["Watts Humphrey attended", "Denny Herzig plays as a", "Ramalinaceae belongs to the family"]
    original = [_logits(session, p) for p in prompts]
    made = [
        session.edit(prompts[0], "University of Michigan", method="grace"),
        session.edit(prompts[1], "goalkeeper", method="wise"),
        session.edit(prompts[2], "Agaricales", layer=0, identity_c=True),
        session.edit("Watts Humphrey studied at", "University of Michigan", method="grace"),
    ]
    edited = [_logits(session, p) for p in prompts]
    path = save_session(session, tmp_path / "mixed.kedit")
    for e in reversed(made):
        session.rollback(e.id)
    assert all(torch.equal(_logits(session, p), o) for p, o in zip(prompts, original))
    loaded = load_session(session, path)
    try:
        assert [e.method for e in loaded] == ["grace", "wise", "rome", "grace"]
        assert all(torch.equal(_logits(session, p), x) for p, x in zip(prompts, edited))
        session.rollback(loaded[0].id)  # loaded edits roll back like any other
    finally:
        for e in list(session.edits):
            session.rollback(e.id)
    assert all(torch.equal(_logits(session, p), o) for p, o in zip(prompts, original))
