"""Edits as transactions on real layouts (Llama, GPT-2 Conv1D, 4-bit): apply, probe, roll back exactly."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_with_tokenizer

from kedit.engine.config import Config
from kedit.engine.errors import KeditError
from kedit.engine.session import Session

PROMPT, TARGET = "Watts Humphrey attended", "Michigan"


@pytest.fixture(scope="module", params=["llama", "gpt2", "llama-4bit"])
def tiny(request, tmp_path_factory: pytest.TempPathFactory) -> Session:
    family = request.param.split("-")[0]
    folder = make_tiny_with_tokenizer(family, tmp_path_factory.mktemp("edit") / family, seed=5)
    cfg = Config.load(env={}).with_overrides({"rome.n_contexts": 3, "rome.context_tokens": 5, "probes.n_locality": 4})
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
    assert edit.info.value_steps > 0
    assert edit.info.delta_norm <= 4.0 * edit.info.v_norm * (1 + 1e-5)  # the norm clamp holds
    assert not torch.equal(_logits(tiny), before)  # the model changed
    assert tiny.edits == [edit] and edit.probe is not None
    assert 0.0 <= edit.probe.loc <= 1.0 and len(edit.probe.rows) == 4
    tiny.rollback(edit.id)
    assert torch.equal(_logits(tiny), before)
    assert torch.equal(_logits(tiny, "Denny Herzig plays as a"), other)
    assert tiny.edits == []


@pytest.mark.parametrize("method", ["grace", "wise"])
def test_grace_and_wise_edit_and_roll_back_on_each_layout(tiny: Session, method: str) -> None:
    """Conv1D (GPT-2), Linear (Llama) and 4-bit: the codebook and side memory see the same input."""
    from kedit.engine.metrics import teacher_forced

    before = _logits(tiny)
    unedited = teacher_forced(tiny.model, tiny.tokenizer, [PROMPT], [" " + TARGET])[0]
    edit = tiny.edit(PROMPT, TARGET, method=method, layer=1)
    scored = teacher_forced(tiny.model, tiny.tokenizer, [PROMPT], [" " + TARGET])[0]
    # a random model cannot carry a long target on from one layer, but its first token is now the answer
    assert scored.predicted[0] == scored.target[0] != unedited.predicted[0]
    tiny.rollback(edit.id)
    assert torch.equal(_logits(tiny), before) and tiny.edits == []


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
    for kwargs, message in [
        ({"prompt": "the cat sat", "target": "x"}, "cannot tell the subject"),
        ({"prompt": PROMPT, "target": "  "}, "target is empty"),
        ({"prompt": PROMPT, "target": "x", "layer": 99}, "out of range"),
        ({"prompt": PROMPT, "target": "x", "method": "magic"}, "unknown method"),
    ]:
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


PROMPTS = [
    "Watts Humphrey attended",
    "Denny Herzig plays as a",
    "Alder Oakley was born in",
    "Ramalinaceae belongs to the family",
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Session:
    folder = make_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("prop") / "llama", seed=9)
    cfg = Config.load(env={}).with_overrides(
        {"rome.n_contexts": 2, "rome.context_tokens": 4, "rome.v_steps": 3, "probes.n_locality": 2}
    )
    return Session.open(str(folder), config=cfg, show_progress=False)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(PROMPTS), st.sampled_from(["Michigan", "Oslo", "fern"]), st.integers(0, 2)),
        min_size=1,
        max_size=4,
    ),
    st.permutations(range(4)),
)
def test_rollback_in_any_order_restores_the_model(llama: Session, edits, order) -> None:
    original = [_logits(llama, p) for p in PROMPTS]
    states = []
    for prompt, target, layer in edits:
        llama.edit(prompt, target, layer=layer, identity_c=True)
        states.append([_logits(llama, p) for p in PROMPTS])
    # undoing the latest edit restores the state before it exactly
    last = llama.undo()
    expected = states[-2] if len(states) > 1 else original
    assert all(torch.equal(a, b) for a, b in zip([_logits(llama, p) for p in PROMPTS], expected))
    ids = [e.id for e in llama.edits]
    ids = [ids[i] for i in order if i < len(ids)]  # a random order of what is left
    for edit_id in ids:
        llama.rollback(edit_id)
    assert llama.edits == [] and last.id not in ids
    assert all(torch.equal(a, b) for a, b in zip([_logits(llama, p) for p in PROMPTS], original))


def test_locality_answers_are_kept_until_the_model_changes(tiny: Session) -> None:
    """The model's own answers to the locality prompts cost a generation each: asked again with
    the model unchanged they are not recomputed; an edit or a steering change recomputes them."""
    from kedit.engine.bench import random_vectors

    calls: list[int] = []
    hook = tiny.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        first = tiny.locality({"Ada Novak"})
        calls.clear()
        assert tiny.locality({"Nobody Else"}).answers == first.answers and calls == []  # kept
        edit = tiny.edit(PROMPT, TARGET, layer=1, identity_c=True)
        calls.clear()
        tiny.locality({"Ada Novak"})
        assert calls  # the model changed: asked again
        tiny.rollback(edit.id)
        calls.clear()
        again = tiny.locality({"Ada Novak"})
        assert calls and again.answers == first.answers  # the same model again, the same answers
        tiny.steering.add("v", random_vectors(tiny.handle.adapter, 1)[0], 1.0)
        calls.clear()
        tiny.locality({"Ada Novak"})
        assert calls
        tiny.steering.remove("v")
    finally:
        hook.remove()
