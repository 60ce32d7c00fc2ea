"""Steering vectors on the fact world: training moves behaviour, the rack adds exactly what it
says, strengths change the next reply as a fresh run would, files round-trip and are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kedit.engine import events as ev
from kedit.engine.errors import KeditError
from kedit.engine.steering import Pair, SteeringVector, train_vector


def _pairs(session, n: int, offset: int = 0) -> list[Pair]:
    people = [f.subject for f in session.fact_world().facts if f.relation == "position"]
    return [Pair(f"{p} plays as a", " defender", " goalkeeper") for p in people[offset:offset + n]]


def _margin(session, pairs: list[Pair]) -> float:
    """Mean log P(positive) − log P(negative) of the first answer token."""
    tok = session.tokenizer
    out = []
    for p in pairs:
        ids = tok(p.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = session.model(ids).logits[0, -1].log_softmax(-1)
        pos = tok(p.positive, add_special_tokens=False)["input_ids"][0]
        neg = tok(p.negative, add_special_tokens=False)["input_ids"][0]
        out.append(float(logp[pos] - logp[neg]))
    return sum(out) / len(out)


@pytest.fixture
def rack(session):
    yield session.steering
    for name in list(session.steering.slots):
        session.steering.remove(name)


@pytest.mark.parametrize("method", ["mean_diff", "pca"])
def test_a_trained_vector_moves_held_out_prompts_with_its_strength(session, rack, method) -> None:
    vector = train_vector(session.handle, _pairs(session, 12), method, layers=[2, 3], read=-1)
    held = _pairs(session, 12, offset=20)
    plain = _margin(session, held)
    margins = []
    for strength in (0.5, 1.0, 2.0):
        rack.add("v", vector, strength)
        margins.append(_margin(session, held))
        rack.remove("v")
    assert margins[0] > plain and margins[1] > margins[0] and margins[2] > margins[1], (plain, margins)
    assert _margin(session, held) == plain  # the empty rack leaves the model as it was


def _block_inputs(session, ids, block: int) -> torch.Tensor:
    """The hidden state entering decoder block ``block`` (what the block before it put out)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = session.handle.adapter.layer(block).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = session.model(ids).logits
    finally:
        handle.remove()
    return seen["x"], logits


def test_the_rack_adds_exactly_strength_times_direction_and_off_is_exact(session, rack) -> None:
    ids = session.tokenizer("Denny Herzig plays as a", return_tensors="pt")["input_ids"]
    before, logits = _block_inputs(session, ids, 2)
    v = torch.randn(session.model.config.hidden_size)
    vec = SteeringVector({1: v}, session.handle.adapter.model_type, session.model.config.hidden_size,
                         "mean_diff", {1: 10.0})
    rack.add("a", vec, 0.5)
    rack.add("b", vec, 0.25, relative=True)
    after, _ = _block_inputs(session, ids, 2)
    expected = 0.5 * v + 0.25 * 10.0 * v / v.norm()
    assert torch.allclose(after - before, expected.expand_as(after), atol=1e-4)
    rack.switch("a", False)
    rack.switch("b", False)
    assert torch.equal(_block_inputs(session, ids, 2)[1], logits)
    assert not rack._handles  # no hook of ours is left on any block


def test_a_strength_change_mid_chat_gives_the_reply_a_fresh_run_gives(session, rack) -> None:
    vector = train_vector(session.handle, _pairs(session, 12), "mean_diff", layers=[2, 3], read=-1)
    rack.add("v", vector, 0.0)
    list(session.run("Where was Denny Herzig born?"))
    rack.set("v", 3.0)
    steered = "".join(e.text for e in session.run("What position does Watts Humphrey play?")
                      if isinstance(e, ev.Reply))
    history = list(session.chat[:2])
    session.reset()
    session.chat.extend(history)  # a fresh conversation that starts with strength 3 in force
    fresh = "".join(e.text for e in session.run("What position does Watts Humphrey play?")
                    if isinstance(e, ev.Reply))
    assert steered == fresh and steered


def test_vectors_round_trip_and_foreign_ones_are_refused(session, tmp_path: Path) -> None:
    vector = train_vector(session.handle, _pairs(session, 4), "mean_diff", layers=[1, 2])
    path = vector.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(path)
    assert back.layers == [1, 2] and all(torch.equal(back.directions[k], vector.directions[k]) for k in (1, 2))
    assert back.norms == vector.norms and back.method == "mean_diff"
    foreign = SteeringVector({0: torch.zeros(64)}, "llama", 64, "mean_diff", {0: 1.0})
    with pytest.raises(KeditError, match="hidden size 64"):
        foreign.check_fits(session.handle)
    foreign.save(tmp_path / "foreign.safetensors")
    out = list(session.run(f"/steer add {tmp_path / 'foreign.safetensors'}"))
    assert isinstance(out[-1], ev.Error) and "hidden size 64" in out[-1].message
    assert not session.steering.slots


def test_steer_commands_train_list_set_toggle_save(session, rack, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(vars(p)) for p in _pairs(session, 6)) + "\n", encoding="utf-8")
    out = list(session.run(f"/steer train {pairs} defend --layers 2-3"))
    assert isinstance(out[-1], ev.Info) and "'defend'" in out[-1].text
    listing = list(session.run("/steer list"))[0]
    assert listing.rows == (("defend", "on", "1", "2-3", "mean_diff"),)
    assert "strength 2.5" in list(session.run("/steer set defend 2.5"))[0].text
    assert "off" in list(session.run("/steer off defend"))[0].text
    assert rack.added(2) is None
    list(session.run(f"/steer save defend {tmp_path / 'd.safetensors'}"))
    assert SteeringVector.load(tmp_path / "d.safetensors").layers == [2, 3]
    for bad in ("/steer set defend loud", "/steer set nobody 1", f"/steer train {tmp_path / 'none.jsonl'} x",
                "/steer add /no/such.safetensors"):
        assert isinstance(list(session.run(bad))[-1], ev.Error), bad
    assert list(rack.slots) == ["defend"] and rack.slots["defend"].strength == 2.5
