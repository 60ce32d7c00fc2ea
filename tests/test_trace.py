"""Causal tracing on the fact world and on tiny random models; the model is left exactly as found."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tiny_models import build_tiny, char_tokenizer

from kedit.engine import trace
from kedit.engine.arch import ArchAdapter
from kedit.engine.factworld.corpus import FactWorld
from kedit.engine.trace import TraceResult, best_edit_layer, cached_edit_layer, causal_trace, window_layers

WATTS = ("Watts Humphrey attended", "Watts Humphrey")
DENNY = ("Denny Herzig plays as a", "Denny Herzig")


def _logits(model: torch.nn.Module, tokenizer, prompt: str) -> torch.Tensor:
    """Full logits of one prompt, for before/after comparisons."""
    with torch.no_grad():
        return model(**tokenizer(prompt, return_tensors="pt")).logits


def _hook_count(model: torch.nn.Module) -> int:
    """Forward hooks registered anywhere in the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def watts(fact_session) -> TraceResult:
    """The trace of "Watts Humphrey attended" with the defaults."""
    h = fact_session.handle
    return causal_trace(h.model, h.tokenizer, h.adapter, *WATTS)


def test_corruption_lowers_the_clean_answer(watts: TraceResult, fact_session) -> None:
    assert watts.answer == " Illinois"
    assert watts.answer_id == fact_session.handle.tokenizer(" Illinois", add_special_tokens=False)["input_ids"][0]
    assert watts.p_clean > 0.9  # observed 0.99
    assert watts.p_corrupt < watts.p_clean  # observed 0.80: " Illinois" stays a common guess
    assert len(watts.effects) == fact_session.handle.adapter.n_layers
    assert 0 <= watts.best_layer < len(watts.effects)


def test_given_target_scores_its_first_token(fact_session, watts: TraceResult) -> None:
    h = fact_session.handle
    r = causal_trace(h.model, h.tokenizer, h.adapter, *WATTS, target=" Illinois Institute of Technology")
    assert r.answer_id == watts.answer_id and r.p_clean == pytest.approx(watts.p_clean)


def test_early_mlps_at_the_subject_hold_the_facts(fact_session) -> None:
    """Averaged over facts, restoring layer 0's MLP at the subject brings most of the answer back."""
    h = fact_session.handle
    shares = []
    for prompt, subject in fact_session.trace_cases():
        r = causal_trace(h.model, h.tokenizer, h.adapter, prompt, subject)
        lost = r.p_clean - r.p_corrupt
        assert r.effects[-1] == 0.0  # the last MLP at a subject token cannot reach the last position
        if lost > 0.05:
            shares.append([e / lost for e in r.effects])
    mean = [sum(s[i] for s in shares) / len(shares) for i in range(h.adapter.n_layers)]
    assert len(shares) >= 8
    assert mean[0] > 0.4 and mean[0] == max(mean)  # observed 0.51, 0.14, 0.11, then |x| < 0.01
    assert mean[0] + mean[1] > 0.6  # the two local-attention layers hold most of it


def test_zero_noise_changes_nothing(fact_session) -> None:
    h = fact_session.handle
    r = causal_trace(h.model, h.tokenizer, h.adapter, *WATTS, noise=0.0, samples=2)
    assert r.p_corrupt == pytest.approx(r.p_clean, abs=1e-5)
    assert all(abs(e) < 1e-5 for e in r.effects)


def test_same_seed_same_effects(fact_session, watts: TraceResult) -> None:
    h = fact_session.handle
    again = causal_trace(h.model, h.tokenizer, h.adapter, *WATTS)
    assert again.effects == watts.effects and again.p_corrupt == watts.p_corrupt
    other = causal_trace(h.model, h.tokenizer, h.adapter, *WATTS, seed=1)
    assert other.p_corrupt != watts.p_corrupt


def test_model_left_exactly_as_found(fact_session) -> None:
    h = fact_session.handle
    before = _logits(h.model, h.tokenizer, WATTS[0])
    hooks = _hook_count(h.model)
    causal_trace(h.model, h.tokenizer, h.adapter, *DENNY, samples=3, window=3)
    assert torch.equal(_logits(h.model, h.tokenizer, WATTS[0]), before)
    assert _hook_count(h.model) == hooks and not h.model.training


def test_hooks_removed_on_error(fact_session, monkeypatch: pytest.MonkeyPatch) -> None:
    h = fact_session.handle
    before = _logits(h.model, h.tokenizer, WATTS[0])
    hooks = _hook_count(h.model)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(trace, "_answer_prob", boom)
    with pytest.raises(RuntimeError, match="boom"):
        causal_trace(h.model, h.tokenizer, h.adapter, *WATTS, samples=2)
    assert _hook_count(h.model) == hooks
    assert torch.equal(_logits(h.model, h.tokenizer, WATTS[0]), before)


def test_chart_has_a_line_per_layer_and_marks_the_best() -> None:
    r = TraceResult("p", "s", " a", 5, 0.9, 0.2, effects=[0.1, 0.4, -0.05, 0.0])
    lines = r.chart(width=20).splitlines()
    assert len(lines) == 4 and r.best_layer == 1
    assert [i for i, line in enumerate(lines) if "best" in line] == [1]
    assert lines[1].startswith("L1 │" + "█" * 20) and lines[1].rstrip().endswith("0.400  ◀ best")
    assert "█" not in lines[2] and "-0.050" in lines[2]
    assert "\x1b" not in r.chart()


def test_window_layers_centre_and_clip() -> None:
    assert window_layers(3, 1, 6) == [3]
    assert window_layers(0, 3, 6) == [0, 1]
    assert window_layers(5, 3, 6) == [4, 5]
    assert window_layers(20, 10, 48) == list(range(15, 25))


def test_best_edit_layer_over_facts(fact_session) -> None:
    h = fact_session.handle
    facts = FactWorld().facts[:20:4]
    layer, means = best_edit_layer(
        h.model, h.tokenizer, h.adapter, [(f.prompt(0), f.subject) for f in facts], samples=4
    )
    assert len(means) == h.adapter.n_layers and 0 <= layer < h.adapter.n_layers
    assert means[layer] == max(means)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_tiny_models_trace_and_restore(model_type: str) -> None:
    model, tok = build_tiny(model_type, seed=0), char_tokenizer()
    adapter = ArchAdapter.for_model(model)
    before = _logits(model, tok, WATTS[0])
    r = causal_trace(model, tok, adapter, *WATTS, samples=3)
    assert len(r.effects) == adapter.n_layers and 0.0 <= r.p_corrupt <= 1.0
    assert len(r.chart().splitlines()) == adapter.n_layers
    assert torch.equal(_logits(model, tok, WATTS[0]), before)
    assert _hook_count(model) == 0


def test_cached_edit_layer(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path))
    handle = SimpleNamespace(cache_key="abc")
    calls: list[int] = []

    def compute() -> int:
        calls.append(1)
        return 3

    assert cached_edit_layer(handle, "rome", compute) == 3
    assert cached_edit_layer(handle, "rome", lambda: 99) == 3
    assert cached_edit_layer(handle, "memit", lambda: 1) == 1
    other = SimpleNamespace(cache_key="def")
    assert cached_edit_layer(other, "rome", lambda: 7) == 7
    stored = json.loads((tmp_path / "layers.json").read_text())
    assert stored == {"abc": {"rome": 3, "memit": 1}, "def": {"rome": 7}}
    assert calls == [1] and [p.name for p in tmp_path.iterdir()] == ["layers.json"]
    (tmp_path / "layers.json").write_text("not json")
    assert cached_edit_layer(handle, "rome", lambda: 2) == 2
