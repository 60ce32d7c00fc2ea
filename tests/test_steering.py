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
    return [Pair(f"{p} plays as a", " defender", " goalkeeper") for p in people[offset : offset + n]]


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
    for strength in (0.25, 0.5, 1.0):
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
    vec = SteeringVector(
        {1: v}, session.handle.adapter.model_type, session.model.config.hidden_size, "mean_diff", {1: 10.0}
    )
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
    steered = "".join(e.text for e in session.run("What position does Watts Humphrey play?") if isinstance(e, ev.Reply))
    history = list(session.chat[:2])
    session.reset()
    session.chat.extend(history)  # a fresh conversation that starts with strength 3 in force
    fresh = "".join(e.text for e in session.run("What position does Watts Humphrey play?") if isinstance(e, ev.Reply))
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
    rec = rack.vector("defend").recommended
    listing = list(session.run("/steer list"))[0]
    shown = f"{rec.strength:g}"
    assert listing.rows == (("defend", "on", shown, f"±{shown}", "2-3", "all", "mean_diff"),)
    assert "strength 2.5" in list(session.run("/steer set defend 2.5"))[0].text
    assert "off" in list(session.run("/steer off defend"))[0].text
    assert rack.added(2) is None
    list(session.run(f"/steer save defend {tmp_path / 'd.safetensors'}"))
    assert SteeringVector.load(tmp_path / "d.safetensors").layers == [2, 3]
    for bad in (
        "/steer set defend loud",
        "/steer set defend 1,2",
        "/steer set nobody 1",
        f"/steer train {tmp_path / 'none.jsonl'} x",
        "/steer add /no/such.safetensors",
    ):
        assert isinstance(list(session.run(bad))[-1], ev.Error), bad
    assert list(rack.slots) == ["defend"] and rack.slots["defend"].strength == 2.5
    out = list(
        session.run(
            '/steer train "Denny Herzig plays as a" quick --positive " goalkeeper" '
            '--negative " defender" --layers 3 --read -1'
        )
    )
    assert isinstance(out[-1], ev.Info) and "1 pair," in out[-1].text
    assert rack.vector("quick").layers == [3] and rack.vector("quick").meta["pairs"] == 1
    assert "both --positive and --negative" in list(session.run('/steer train "x" q --positive " a"'))[-1].message


def _random_vector(session, layers, seed: int = 0, scale: float = 1.0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    hidden = session.model.config.hidden_size
    return SteeringVector(
        {layer: scale * torch.randn(hidden, generator=g) for layer in layers},
        session.handle.adapter.model_type,
        hidden,
        "mean_diff",
        {layer: 10.0 for layer in layers},
    )


def _logits(session, text: str) -> torch.Tensor:
    ids = session.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return session.model(ids).logits


def test_stacking_two_vectors_equals_racking_their_linear_merge(session, rack) -> None:
    from kedit.engine.steering import merge_vectors

    a, b = _random_vector(session, [1, 2], 1), _random_vector(session, [2, 3], 2)
    text = "Denny Herzig plays as a"
    plain = _logits(session, text)
    rack.add("a", a, 0.7)
    rack.add("b", b, -0.4)
    stacked = _logits(session, text)
    rack.switch("a", False)
    rack.switch("b", False)
    assert torch.equal(_logits(session, text), plain)
    rack.add("ab", merge_vectors([a, b], [0.7, -0.4], "linear"), 1.0)
    assert torch.equal(_logits(session, text), stacked)
    assert not torch.allclose(stacked, plain)


def test_orthogonal_merge_counts_a_shared_direction_once_and_ties_elects_signs(session) -> None:
    from kedit.engine.steering import merge_vectors

    hidden = session.model.config.hidden_size
    e1, e2 = torch.zeros(hidden), torch.zeros(hidden)
    e1[0], e2[1] = 1.0, 1.0
    mk = lambda d: SteeringVector({2: d}, session.handle.adapter.model_type, hidden, "mean_diff", {2: 5.0})  # noqa: E731
    a, b = mk(2 * e1), mk(3 * e1 + 4 * e2)  # b shares a's direction
    ortho = merge_vectors([a, b], mode="orthogonal").directions[2]
    assert torch.allclose(ortho, 2 * e1 + 4 * e2)  # b's e1 part (3) is dropped, a's kept
    assert torch.allclose(merge_vectors([a, b]).directions[2], 5 * e1 + 4 * e2)
    c = mk(-1 * e1 + 4 * e2)
    ties = merge_vectors([a, c], mode="ties").directions[2]
    assert torch.allclose(ties, 2 * e1 + 4 * e2)  # e1: +2 and -1 elect +, only +2 averaged
    with pytest.raises(KeditError, match="hidden sizes"):
        merge_vectors([a, SteeringVector({2: torch.ones(8)}, "", 8, "x", {})])


def test_steer_merge_command_racks_the_merge_and_turns_its_sources_off(session, rack) -> None:
    rack.add("a", _random_vector(session, [1], 1), 1.0)
    rack.add("b", _random_vector(session, [1], 2), 1.0)
    stacked = _logits(session, "Watts Humphrey attended")
    out = list(session.run("/steer merge a b --weights 1,1 -> ab"))
    assert isinstance(out[-1], ev.Info) and "'ab'" in out[-1].text
    assert [(n, s.on) for n, s in rack.slots.items()] == [("a", False), ("b", False), ("ab", True)]
    assert torch.allclose(_logits(session, "Watts Humphrey attended"), stacked, atol=1e-5)
    for bad in (
        "/steer merge a -> x",
        "/steer merge a nobody -> x",
        "/steer merge a b",
        "/steer merge a b -> ab",
        "/steer merge a b --weights 1 -> y",
        "/steer add f 1 extra",
    ):
        assert isinstance(list(session.run(bad))[-1], ev.Error), bad
    assert list(rack.slots) == ["a", "b", "ab"]


def test_generated_only_steering_leaves_the_prompt_alone_and_steers_what_follows(session, rack) -> None:
    prompt = session.tokenizer("Denny Herzig plays as a", return_tensors="pt")["input_ids"]
    full = torch.cat(
        [prompt, session.tokenizer(" defender.", add_special_tokens=False, return_tensors="pt")["input_ids"]], dim=1
    )
    with torch.no_grad():
        plain = session.model(full).logits
    rack.add("g", _random_vector(session, [1, 2], 3, scale=0.5), 1.0, where="generated")
    with torch.no_grad():
        outside = session.model(full).logits  # no generation open: nothing is a generated token
        with rack.generating(prompt.shape[1]):
            inside = session.model(full).logits
    n = prompt.shape[1]
    assert torch.equal(outside, plain)
    assert torch.equal(inside[:, :n], plain[:, :n])  # the prompt's own positions are untouched
    assert not torch.allclose(inside[:, n:], plain[:, n:])


@pytest.mark.parametrize("where", ["all", "generated"])
def test_cached_generation_after_a_strength_change_matches_a_fresh_uncached_run(session, rack, where) -> None:
    vector = train_vector(session.handle, _pairs(session, 12), "mean_diff", layers=[2, 3], read=-1)
    rack.add("v", vector, 0.5, where=where)
    text = session.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What position does Denny Herzig play?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = session.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def generate(cache: bool) -> list[int]:
        with torch.no_grad(), rack.generating(ids.shape[1]):
            out = session.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=16,
                do_sample=False,
                use_cache=cache,
                pad_token_id=session.tokenizer.pad_token_id,
            )
        return out[0, ids.shape[1] :].tolist()

    before = generate(True)
    rack.set("v", 4.0)
    cached, fresh = generate(True), generate(False)
    assert cached == fresh
    assert cached != before  # the change did reach the reply


def test_gguf_export_has_llama_cpp_layout_and_round_trips(session, tmp_path: Path) -> None:
    import gguf

    from kedit.engine.vector_io import export_gguf, import_gguf, load_vector

    vector = _random_vector(session, [0, 1, 2, 5], 4)
    path, dropped = export_gguf(vector, tmp_path / "v.gguf")
    assert dropped == [0]
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == session.handle.adapter.model_type
    assert reader.fields["controlvector.layer_count"].contents() == 3
    names = sorted(t.name for t in reader.tensors)
    assert names == ["direction.1", "direction.2", "direction.5"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    back = import_gguf(path)
    assert back.layers == [1, 2, 5]
    assert all(torch.equal(back.directions[k], vector.directions[k]) for k in back.layers)
    assert (back.model_type, back.hidden_size, back.method, back.norms) == (
        vector.model_type,
        vector.hidden_size,
        vector.method,
        {1: 10.0, 2: 10.0, 5: 10.0},
    )
    assert load_vector(path).layers == [1, 2, 5]


def test_repeng_style_gguf_and_easyedit2_folders_import_and_foreign_ones_are_refused(
    session, rack, tmp_path: Path
) -> None:
    import gguf
    import numpy as np

    hidden = session.model.config.hidden_size
    d = np.arange(hidden, dtype=np.float32) / hidden

    def write(path: Path, hint: str, size: int) -> Path:  # as repeng writes: no kedit metadata
        w = gguf.GGUFWriter(str(path), "controlvector")
        w.add_string("controlvector.model_hint", hint)
        w.add_uint32("controlvector.layer_count", 1)
        w.add_tensor("direction.3", np.resize(d, size).astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    write(tmp_path / "calm.gguf", session.handle.adapter.model_type, hidden)
    out = list(session.run(f"/steer add {tmp_path / 'calm.gguf'} 2"))
    assert isinstance(out[-1], ev.Info), out
    assert torch.equal(rack.added(3), 2 * torch.from_numpy(d))
    write(tmp_path / "llama.gguf", "llama", hidden)
    assert "llama" in list(session.run(f"/steer add {tmp_path / 'llama.gguf'}"))[-1].message
    write(tmp_path / "wide.gguf", session.handle.adapter.model_type, hidden + 8)
    assert "hidden size" in list(session.run(f"/steer add {tmp_path / 'wide.gguf'}"))[-1].message
    write(tmp_path / "calm2.gguf", session.handle.adapter.model_type, hidden)  # GGUF stores no norms
    assert "relative" in list(session.run(f"/steer add {tmp_path / 'calm2.gguf'} 1 --relative"))[-1].message

    folder = tmp_path / "happy" / "caa_vector"
    folder.mkdir(parents=True)
    for layer in (2, 4):
        torch.save(torch.full((hidden,), float(layer)), folder / f"layer_{layer}.pt")
    out = list(session.run(f"/steer add {folder} 0.5"))
    assert isinstance(out[-1], ev.Info) and "'happy'" in out[-1].text
    assert rack.vector("happy").layers == [2, 4] and torch.equal(rack.added(4), torch.full((hidden,), 2.0))


class _Payload:
    def __reduce__(self):
        import os

        return (os.mkdir, (os.environ["KEDIT_PWNED"],))


def test_loading_an_easyedit2_file_never_runs_pickled_code(session, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "pwned"
    monkeypatch.setenv("KEDIT_PWNED", str(target))
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save(_Payload(), folder / "layer_1.pt")
    out = list(session.run(f"/steer add {folder}"))
    assert isinstance(out[-1], ev.Error) and "only tensors" in out[-1].message
    assert not target.exists() and not session.steering.slots


def test_sweep_reports_margin_and_perplexity_and_puts_the_slot_back(session, rack, tmp_path: Path) -> None:
    held = tmp_path / "held.jsonl"
    held.write_text("\n".join(json.dumps(vars(p)) for p in _pairs(session, 12, offset=20)) + "\n", encoding="utf-8")
    vector = train_vector(session.handle, _pairs(session, 12), "mean_diff", layers=[2, 3], read=-1)
    rack.add("v", vector, 0.25)
    rack.switch("v", False)
    out = list(session.run(f"/steer sweep v --pairs {held} --strengths 0,0.5,1"))
    assert any(isinstance(e, ev.Progress) for e in out)
    table = out[-1]
    assert isinstance(table, ev.Table) and [r[0] for r in table.rows] == ["0", "0.5", "1"]
    margins = [float(r[1]) for r in table.rows]
    assert margins[0] < margins[1] < margins[2]
    assert all(float(r[2]) > 1 for r in table.rows)
    slot = rack.slots["v"]
    assert (slot.strength, slot.on) == (0.25, False) and rack.added(2) is None


def test_train_recommends_the_largest_strength_within_the_perplexity_limit(
    session, rack, tmp_path: Path, monkeypatch
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(vars(p)) for p in _pairs(session, 12)) + "\n", encoding="utf-8")
    monkeypatch.setattr(session, "config", session.config.with_overrides({"steering.max_perplexity_ratio": 1.1}))
    out = list(session.run(f"/steer train {pairs} defend --layers 2-3 --read -1"))
    assert any(isinstance(e, ev.Progress) and "recommended strength" in e.label for e in out)
    rec = rack.vector("defend").recommended
    assert rec.limit == 1.1 and rec.neutral == "the fact world's facts"
    assert rack.slots["defend"].strength == rec.strength
    assert f"recommended strength ±{rec.strength:g}" in out[-1].text
    assert rec.strength > 0 and max(rec.ratio, rec.opposite) <= 1.1, rec
    assert any(rec.strength < abs(s) <= 1.25 * rec.strength and r > 1.1 for s, r in rec.tried), rec.tried
    assert all(float(f"{abs(s):.2g}") == abs(s) for s, _ in rec.tried)  # every strength tried reads well
    # a vector without a recommendation (the shipped ones) is added at its file's strength, shown as '-'
    assert "at strength 0.5" in list(session.run("/steer add vectors/fact-world-mood.safetensors"))[-1].text
    assert list(session.run("/steer list"))[0].rows[-1][2:4] == ("0.5", "-")
    monkeypatch.setattr(session, "config", session.config.with_overrides({"steering.max_perplexity_ratio": 1}))
    assert "above 1" in list(session.run(f"/steer train {pairs} other --layers 2-3"))[-1].message
    assert "other" not in rack.slots
