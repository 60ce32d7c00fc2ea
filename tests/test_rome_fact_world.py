"""ROME on the fact world: the figures issue 3 asks for, measured with the probes' metrics.

Each test prints its figures (pytest -s shows them).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from fact_cases import edit_cases, prompt_logits

from kedit.engine.metrics import mean_accuracy, teacher_forced

N = 20


def _unedited_unseen_recall(session, cases) -> float:
    """The model's own recall of these facts on the phrasings it never saw for them."""
    facts = [f for f, _ in cases]
    return mean_accuracy(
        teacher_forced(
            session.model, session.tokenizer, [f.prompt(f.held_out) for f in facts], [f.target for f in facts]
        )
    )


def _edit_and_roll_back_each(session, cases, unrelated: list[str]):
    """Apply each edit alone and roll it back; the unrelated prompts' logits must return exactly."""
    original = prompt_logits(session, unrelated)
    rel, gen, loc, times, back = [], [], [], [], []
    for f, new in cases:
        e = session.edit(f.prompt(0), new, subject=f.subject)
        rel.append(e.probe.rel)
        gen.append(e.probe.gen)
        loc.append(e.probe.loc)
        times.append(e.seconds)
        t = time.perf_counter()
        session.rollback(e.id)
        back.append(time.perf_counter() - t)
        assert all(torch.equal(a, b) for a, b in zip(prompt_logits(session, unrelated), original))
    return rel, gen, loc, times, back


def test_single_edits_rel_gen_loc_and_exact_rollback(session) -> None:
    cases = edit_cases(session, N, 1)
    baseline = _unedited_unseen_recall(session, cases)
    unrelated = [f.prompt(0) for f in session.fact_world().facts[:8]]
    rel, gen, loc, times, back = _edit_and_roll_back_each(session, cases, unrelated)
    figures = {
        "Rel": statistics.mean(rel),
        "Gen": statistics.mean(gen),
        "Loc": statistics.mean(loc),
        "unedited recall, unseen phrasings": baseline,
        "median edit s": statistics.median(times),
        "median rollback ms": 1000 * statistics.median(back),
    }
    print("\nROME, 20 single edits:", {k: round(v, 4) for k, v in figures.items()})
    assert figures["Rel"] >= 0.95
    assert figures["Loc"] >= 0.95
    assert figures["Gen"] >= 0.8 * baseline


def _distinct_subjects(session, n: int = N, seed: int = 2):
    """n facts about n subjects that share no name word with each other.

    ROME keys a fact by the subject's last token; on the fact world that key is made of the
    subject's own two name tokens, so subjects sharing a first or last name (or one subject
    edited twice) have overlapping keys and later edits overwrite earlier ones. That limit
    is reported in the issue note; this set measures ROME where keys are distinct.
    """
    out, used = [], set()
    for f, new in edit_cases(session, len(session.fact_world().facts), seed):
        words = set(f.subject.split())
        if words & used:
            continue
        used |= words
        out.append((f, new))
        if len(out) == n:
            break
    return out


def test_twenty_sequential_edits(session) -> None:
    cases = _distinct_subjects(session)
    assert len(cases) == N
    edited_subjects = {f.subject for f, _ in cases}
    loc_facts = [f for f in session.fact_world().facts if f.subject not in edited_subjects][:40]
    tok, model = session.tokenizer, session.model
    before = teacher_forced(model, tok, [f.prompt(0) for f in loc_facts], [f.target for f in loc_facts])
    original = prompt_logits(session, [f.prompt(0) for f in loc_facts[:5]])
    edits = [session.edit(f.prompt(0), new, subject=f.subject, probe=False) for f, new in cases]
    try:
        rel = [
            s.accuracy
            for s in teacher_forced(model, tok, [f.prompt(0) for f, _ in cases], [" " + new for _, new in cases])
        ]
        gen = mean_accuracy(
            teacher_forced(model, tok, [f.prompt(f.held_out) for f, _ in cases], [" " + new for _, new in cases])
        )
        after = teacher_forced(model, tok, [f.prompt(0) for f in loc_facts], [f.target for f in loc_facts])
        from kedit.engine.metrics import unchanged_share

        loc = unchanged_share(before, after)
        print(
            f"\nROME, 20 sequential edits, after the 20th: Rel min {min(rel):.3f} mean "
            f"{statistics.mean(rel):.3f}, Gen {gen:.3f}, Loc {loc:.3f}"
        )
        assert min(rel) >= 0.9
    finally:
        for e in reversed(edits):
            session.rollback(e.id)
    assert all(
        torch.equal(a, b) for a, b in zip(prompt_logits(session, [f.prompt(0) for f in loc_facts[:5]]), original)
    )


def test_a_later_edit_gives_none_of_its_change_to_the_earlier_edits_keys(session) -> None:
    """Each ROME edit records its key k* on the layer's sidecar while it is in force; a later
    edit's direction d (d·x is the share of δ added at input x) is 1 at its own key and 0 at
    those, unless it edits the same subject again, which it then overrides."""
    (fa, new_a), (fb, new_b) = _distinct_subjects(session, 2)
    a = session.edit(fa.prompt(0), new_a, subject=fa.subject)
    try:
        side = a.patch.side
        k_a = side.keys[a.id][0]
        b = session.edit(fb.prompt(0), new_b, subject=fb.subject)
        try:
            assert list(side.keys) == [a.id, b.id] and b.info.kept_keys == 1
            d_b, k_b = b.patch.v[:, 0].double(), side.keys[b.id][0].double()
            assert abs(float(d_b @ k_b) - 1) < 1e-3 and abs(float(d_b @ k_a.double())) < 1e-4
        finally:
            session.rollback(b.id)
        assert list(side.keys) == [a.id]
        plain = session.edit(fb.prompt(0), new_b, subject=fb.subject, params={"keep_earlier": False})
        try:  # the paper's update reaches the earlier key; and records no key of its own
            assert abs(float(plain.patch.v[:, 0].double() @ k_a.double())) > 1e-3
            assert plain.info.kept_keys == 0 and list(side.keys) == [a.id]
        finally:
            session.rollback(plain.id)
        again = session.edit(fa.prompt(0), new_b, subject=fa.subject)
        try:  # the same subject edited again: its earlier key is the one to move
            assert again.info.kept_keys == 0
        finally:
            session.rollback(again.id)
    finally:
        session.rollback(a.id)
    assert not side.keys


def test_traced_layer_beats_the_worst_layer(session) -> None:
    from kedit.engine.trace import best_edit_layer

    h = session.handle
    best, effects = best_edit_layer(h.model, h.tokenizer, h.adapter, session.trace_cases())
    worst = min(range(len(effects)), key=lambda i: effects[i])
    assert session.method_params("rome").layer is None  # the fact world has no configured layer: tracing decides
    scores = {}
    for layer in (best, worst):
        rel = []
        for f, new in edit_cases(session, 10, 3):
            e = session.edit(f.prompt(0), new, subject=f.subject, layer=layer)
            rel.append(e.probe.rel)
            session.undo()
        scores[layer] = statistics.mean(rel)
    print(f"\ntraced layer {best}: Rel {scores[best]:.3f}; worst-traced layer {worst}: Rel {scores[worst]:.3f}")
    assert best != worst and scores[best] > scores[worst] + 0.3


@pytest.fixture(scope="module")
def session_4bit(fact_world_dir):
    from kedit.engine.config import Config
    from kedit.engine.session import Session

    return Session.open(None, quant="4bit", config=Config.load(), show_progress=False)


# bitsandbytes' CPU kernel for AVX512-BF16 machines adds a biased 4-bit layer's bias in place
# (`result += bias` in matmul_4bit), which autograd refuses when an edit trains through the layer.
# That is a bitsandbytes bug on those CPUs, not kedit's; elsewhere these tests must pass.
BNB_AVX512 = pytest.mark.xfail(
    torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
    raises=RuntimeError,
    strict=False,
    reason="bitsandbytes' AVX512-BF16 CPU path breaks autograd through a biased 4-bit layer",
)


@BNB_AVX512
def test_single_edits_on_a_4bit_load(session_4bit) -> None:
    s = session_4bit
    cases = edit_cases(s, 10, 1)
    baseline = _unedited_unseen_recall(s, cases)
    unrelated = [f.prompt(0) for f in s.fact_world().facts[:5]]
    rel, gen, loc, _, _ = _edit_and_roll_back_each(s, cases, unrelated)
    print(
        f"\nROME on 4-bit, 10 single edits: Rel {statistics.mean(rel):.3f}, Gen {statistics.mean(gen):.3f}, "
        f"Loc {statistics.mean(loc):.3f} (unedited 4-bit recall on unseen phrasings {baseline:.3f})"
    )
    # looser than full precision: NF4 weights blur both the keys and the statistics
    assert statistics.mean(rel) >= 0.85
    assert statistics.mean(loc) >= 0.9
    assert statistics.mean(gen) >= 0.6 * baseline


@BNB_AVX512
def test_grace_and_wise_on_a_4bit_load_leave_the_quantized_weights_alone(session_4bit) -> None:
    s = session_4bit
    module = s.handle.adapter.mlp_out(3)
    packed = module.weight.data.clone()
    ids = s.tokenizer("Denny Herzig plays as a", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = s.model(ids).logits
    for method in ("grace", "wise"):
        e = s.edit("Watts Humphrey attended", "University of Michigan", method=method)
        assert e.probe.rel == 1.0 and e.probe.loc >= 0.95, (method, e.probe.summary())
    assert torch.equal(module.weight.data, packed)  # the NF4 bytes never change
    s.undo()
    s.undo()
    with torch.no_grad():
        assert torch.equal(s.model(ids).logits, before)
