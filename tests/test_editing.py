"""Edits as transactions on real layouts (Llama, GPT-2 Conv1D, 4-bit): apply, probe, roll back exactly."""

from __future__ import annotations

import pytest
import torch

from kedit.engine.config import Config
from kedit.engine.errors import KeditError
from kedit.engine.session import Session
from tiny_models import make_tiny_with_tokenizer

PROMPT, TARGET = "Watts Humphrey attended", "Michigan"


@pytest.fixture(scope="module", params=["llama", "gpt2", "llama-4bit"])
def tiny(request, tmp_path_factory: pytest.TempPathFactory) -> Session:
    family = request.param.split("-")[0]
    folder = make_tiny_with_tokenizer(family, tmp_path_factory.mktemp("edit") / family, seed=5)
    cfg = Config.load(env={}).with_overrides({"rome.n_contexts": 3, "rome.context_tokens": 5,
                                              "probes.n_locality": 4})
    quant = "4bit" if request.param.endswith("4bit") else None
    return Session.open(str(folder), quant=quant, config=cfg, show_progress=False)


def _logits(session: Session, text: str = PROMPT) -> torch.Tensor:
    ids = session.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return session.model(ids).logits


def test_edit_then_rollback_is_exact(tiny: Session) -> None:
    before = _logits(tiny)
    other = _logits(tiny, "Denny Herzig plays as a")
    edit = tiny.edit(PROMPT, TARGET, layer=1, identity_c=True)
    assert edit.subject == "Watts Humphrey" and edit.subject_how == "inferred"
    assert edit.info["value_steps"] > 0
    assert edit.info["delta_norm"] <= 4.0 * edit.info["v_norm"] * (1 + 1e-5)  # the norm clamp holds
    assert not torch.equal(_logits(tiny), before)  # the model changed
    assert tiny.edits == [edit] and edit.probe is not None
    assert 0.0 <= edit.probe.loc <= 1.0 and len(edit.probe.rows) == 4
    tiny.rollback(edit.id)
    assert torch.equal(_logits(tiny), before)
    assert torch.equal(_logits(tiny, "Denny Herzig plays as a"), other)
    assert tiny.edits == []


def test_a_failing_edit_leaves_the_model_bit_identical(tiny: Session, monkeypatch) -> None:
    before = _logits(tiny)
    import kedit.engine.probes as probes

    def broken(*a, **k):
        raise RuntimeError("probe failed")

    monkeypatch.setattr(probes, "probe", broken)
    with pytest.raises(RuntimeError):
        tiny.edit(PROMPT, TARGET, layer=1, identity_c=True)
    assert torch.equal(_logits(tiny), before) and tiny.edits == []


def test_bad_requests_are_refused_before_anything_changes(tiny: Session) -> None:
    before = _logits(tiny)
    for kwargs, message in [({"prompt": "the cat sat", "target": "x"}, "cannot tell the subject"),
                            ({"prompt": PROMPT, "target": "  "}, "target is empty"),
                            ({"prompt": PROMPT, "target": "x", "layer": 99}, "out of range"),
                            ({"prompt": PROMPT, "target": "x", "method": "magic"}, "unknown method")]:
        with pytest.raises(KeditError, match=message):
            tiny.edit(**kwargs)
    assert torch.equal(_logits(tiny), before)
    with pytest.raises(KeditError, match="no edit"):
        tiny.rollback("e999")


def test_fact_world_probe_uses_its_own_facts_and_paraphrases(session: Session) -> None:
    before = _logits(session)
    edit = session.edit("Watts Humphrey attended", "University of Michigan", layer=1, identity_c=True)
    try:
        assert edit.target == " University of Michigan"
        held = session.fact_world().fact("Watts Humphrey", "attended")
        assert edit.paraphrases == [held.prompt(held.held_out)]  # wording never trained for it
        assert edit.probe.gen is not None and len(edit.probe.rows) == 24
        assert all("Watts Humphrey" not in r.prompt for r in edit.probe.rows)
        assert 0.0 <= edit.probe.rel <= 1.0 and edit.probe.kl >= 0.0
    finally:
        session.rollback(edit.id)
    assert torch.equal(_logits(session), before)
