"""MEMIT and AlphaEdit: the solves' mathematics, batch edits on the fact world, exact rollback,
batches in the ledger, persistence, and 4-bit loads. Each test prints its figures (pytest -s)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from fact_cases import edit_cases, prompt_logits

from kedit.engine.errors import KeditError
from kedit.engine.evaluate import EvalCase, edit_in_batches, read_cases
from kedit.engine.methods.base import EditRequest
from kedit.engine.methods.memit.method import earlier_keys, key_units
from kedit.engine.methods.memit.solve import AlphaEditSolve, alphaedit_factors, memit_factors, null_space
from kedit.engine.methods.rome.stats import key_stats


def _keys_in_subspace(g: torch.Generator, n: int, d: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n keys (rows) that use only ``rank`` of ``d`` directions, and that basis (d, rank)."""
    basis, _ = torch.linalg.qr(torch.randn(d, rank, generator=g))
    return torch.randn(n, rank, generator=g) @ basis.T, basis


def _ordinary_keys(g: torch.Generator, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4,000 keys (rows) that use every direction a little, none much (a real model's), and their
    second moment C."""
    scales = torch.linspace(0.2, 2.0, d)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    ordinary = (torch.randn(4000, d, generator=g) * scales) @ basis.T
    return ordinary, ordinary.T @ ordinary / len(ordinary)


def test_memit_solve_is_the_least_squares_solution() -> None:
    """Δ = U Vᵀ minimises ‖Δ K - R‖² + λ tr(Δ C Δᵀ): its normal equations Δ (λC + K Kᵀ) = R Kᵀ
    hold, and moving Δ in any direction raises the objective."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n, lam = 48, 32, 6, 5.0
    a = torch.randn(d_in, 400, generator=g)
    c = a @ a.T / 400
    k = torch.randn(n, d_in, generator=g)
    r = torch.randn(n, d_out, generator=g)
    v = memit_factors(c, k, lam)  # (d_in, n)
    delta = (r.T @ v.T).double()  # U = R (d_out, n)
    kd, cd, rd = k.double().T, c.double(), r.double().T
    lhs, rhs = delta @ (lam * cd + kd @ kd.T), rd @ kd.T
    residual = float((lhs - rhs).norm() / rhs.norm())
    print(f"\nMEMIT normal-equation residual {residual:.2e}")
    assert residual < 1e-4

    def objective(x: torch.Tensor) -> float:
        return float((x @ kd - rd).pow(2).sum() + lam * torch.trace(x @ cd @ x.T))

    best = objective(delta)
    for _ in range(5):
        assert objective(delta + 1e-3 * torch.randn(delta.shape, generator=g, dtype=torch.float64)) > best


def test_alphaedit_projection_leaves_preserved_keys_alone() -> None:
    """P projects the preserved keys to about zero, so the update does nothing to them; the
    solve satisfies its normal equations (P G P + μI) V = P K; earlier batches' keys are kept."""
    g = torch.Generator().manual_seed(1)
    d, rank, n = 64, 40, 5
    preserved, _ = _keys_in_subspace(g, 2000, d, rank)
    c = preserved.T @ preserved / len(preserved)
    space = null_space(c, 0.02)
    assert space.kept == d - rank  # the directions the preserved keys never use
    projected = space.project(preserved.T)
    share = float(projected.norm() / preserved.norm())
    print(f"\n‖P k‖ / ‖k‖ over 2000 preserved keys: {share:.2e}")
    assert share < 1e-4

    keys = torch.randn(n, d, generator=g)
    r = torch.randn(n, 16, generator=g)
    mu = 0.1
    v = alphaedit_factors(space, keys, None, mu)
    delta = r.T @ v.T
    moved = float((delta @ preserved.T).norm() / (delta @ keys.T).norm())
    print(f"update on preserved keys / on edited keys: {moved:.2e}")
    assert moved < 1e-4
    p = space.q.double() @ space.q.double().T
    kd = keys.double().T
    lhs = (p @ (kd @ kd.T) @ p + mu * torch.eye(d, dtype=torch.float64)) @ v.double()
    assert float((lhs - p @ kd).norm() / (p @ kd).norm()) < 1e-4

    # an earlier batch whose keys share directions with this one's: kept far better with them in the solve
    earlier = keys[:2] + 0.3 * torch.randn(2, d, generator=g)
    plain = r.T @ alphaedit_factors(space, keys, None, mu).T
    keeping = r.T @ alphaedit_factors(space, keys, earlier, mu).T
    drift_plain = float((plain @ earlier.T).norm())
    drift_keeping = float((keeping @ earlier.T).norm())
    print(f"change at an earlier batch's keys: {drift_plain:.3f} without them in the solve, {drift_keeping:.3f} with")
    assert drift_keeping < 0.5 * drift_plain


def test_alphaedit_preservation_term_prices_what_p_leaves_in() -> None:
    """Keys that use every direction a little (a real model's): P at a relative threshold keeps
    some of their energy. With ``weight`` λ the solve adds λ tr(Δ'P C PΔ'ᵀ) and satisfies
    (P (G + λC) P + μI) V = P K; the update then moves ordinary keys less, still fitting the edits."""
    g = torch.Generator().manual_seed(2)
    d, n = 64, 6
    ordinary, c = _ordinary_keys(g, d)
    space = null_space(c, 0.5)
    assert 0 < space.kept < d
    kept_energy = float(space.project(ordinary.T).pow(2).sum() / ordinary.pow(2).sum())
    print(f"\nP keeps {kept_energy:.3f} of the ordinary keys' energy ({space.kept} of {d} directions)")
    assert kept_energy > 0.01  # not a null space: the term has something to do

    keys = torch.randn(n, d, generator=g)
    r = torch.randn(n, 16, generator=g)
    mu, lam = 0.1, 20.0
    v = alphaedit_factors(space, keys, None, mu, lam).double()
    p = space.q.double() @ space.q.double().T
    kd, cd = keys.double().T, c.double()
    lhs = (p @ (kd @ kd.T + lam * cd) @ p + mu * torch.eye(d, dtype=torch.float64)) @ v
    residual = float((lhs - p @ kd).norm() / (p @ kd).norm())
    print(f"normal-equation residual with the term {residual:.2e}")
    assert residual < 1e-4
    assert torch.allclose(alphaedit_factors(space, keys, None, mu, 0.0), alphaedit_factors(space, keys, None, mu))

    def figures(vv: torch.Tensor) -> tuple[float, float]:
        delta = r.double().T @ vv.double().T
        fit = float((delta @ kd - r.double().T).norm() / r.norm())
        moved = float(torch.trace(delta @ cd @ delta.T).sqrt() / torch.trace(r.double().T @ r.double()).sqrt())
        return fit, moved

    fit0, moved0 = figures(alphaedit_factors(space, keys, None, mu))
    fit1, moved1 = figures(v)
    print(
        f"misfit / change on ordinary keys: without the term {fit0:.3f} / {moved0:.3f}, with {fit1:.3f} / {moved1:.3f}"
    )
    assert moved1 < 0.7 * moved0
    assert fit1 < 0.3


def test_alphaedit_pullback_counts_preservation_from_the_unedited_weights() -> None:
    """A batch after earlier ones: with the pull-back, its change A Qᵀ solves the normal equations
    of the term counted from the unedited weights, A M = R KᵀQ - λ Δₚ C Q, stays inside P, and
    leaves the total change on ordinary keys smaller than the earlier batches left it, while
    it still fits its own facts and keeps the earlier batches' keys."""
    g = torch.Generator().manual_seed(3)
    d, n, d_out = 64, 6, 16
    _, c = _ordinary_keys(g, d)
    space = null_space(c, 0.5)
    mu, lam = 0.1, 20.0
    cd = c.double()

    # three earlier batches, each solved with the ones before it in its keys
    earlier_keys: list[torch.Tensor] = []
    us, vs = [], []
    for _ in range(3):
        k = torch.randn(n, d, generator=g)
        r = torch.randn(n, d_out, generator=g)
        prev = torch.cat(earlier_keys) if earlier_keys else None
        vs.append(alphaedit_factors(space, k, prev, mu, lam))
        us.append(r.T)
        earlier_keys.append(k)
    before = (torch.cat(us, dim=1), torch.cat(vs, dim=1))
    kp = torch.cat(earlier_keys)
    keys = torch.randn(n, d, generator=g)
    r = torch.randn(n, d_out, generator=g)
    solve = AlphaEditSolve(space, keys, kp, mu, lam)
    v = solve.factors()
    extra = solve.extra(before)
    assert extra is not None
    u2, v2 = extra
    assert u2.shape[1] == v2.shape[1] <= min(d_out, before[0].shape[1])
    delta = (r.T @ v.T + u2 @ v2.T).double()
    past = (before[0] @ before[1].T).double()

    q = space.q.double()
    kd, jd = keys.double().T, torch.cat([keys, kp]).double().T
    m = q.T @ jd @ jd.T @ q + mu * torch.eye(space.kept, dtype=torch.float64) + lam * q.T @ cd @ q
    a = delta @ q
    rhs = r.double().T @ kd.T @ q - lam * past @ cd @ q
    residual = float((a @ m - rhs).norm() / rhs.norm())
    outside = float((delta - a @ q.T).norm() / delta.norm())
    print(f"\nnormal-equation residual {residual:.2e}; change outside P {outside:.2e}")
    assert residual < 1e-4 and outside < 1e-5

    def on_ordinary(change: torch.Tensor) -> float:
        return float(torch.trace(change @ cd @ change.T).sqrt())

    def misfit_and_drift(change: torch.Tensor) -> tuple[float, float]:
        fit = float((change @ kd - r.double().T).norm() / r.norm())
        return fit, float((change @ kp.double().T).norm() / (past @ kp.double().T).norm())

    plain = r.double().T @ v.double().T
    was = on_ordinary(past)
    total_plain, total_pulled = on_ordinary(past + plain), on_ordinary(past + delta)
    (fit0, drift0), (fit1, drift1) = misfit_and_drift(plain), misfit_and_drift(delta)
    print(
        f"change on ordinary keys: earlier batches {was:.3f}, with this one {total_plain:.3f} without the pull-back,"
        f" {total_pulled:.3f} with; misfit {fit0:.3f} / {fit1:.3f}, change at earlier keys {drift0:.3f} / {drift1:.3f}"
    )
    assert total_pulled - was < 0.5 * (total_plain - was)
    assert fit1 < 0.5 and drift1 < 0.3


def test_alphaedit_refit_fits_earlier_keys_to_their_own_targets() -> None:
    """With ``lack`` (what each earlier key still lacks of its own batch's target), a batch's
    change A Qᵀ solves the normal equations A M = R KᵀQ + lack KₚᵀQ - λ Δₚ C Q (with the
    pull-back). Over ten batches whose keys overlap earlier ones (as people sharing a surname's
    last token do), the first batch's facts then end near their targets, where keeping them "as
    now" under the pull-back shrinks them again at every batch."""
    g = torch.Generator().manual_seed(5)
    d, n, d_out, batches = 128, 4, 16, 10
    _, c = _ordinary_keys(g, d)
    space = null_space(c, 0.5)
    mu, lam = 0.1, 20.0
    shared = torch.randn(n, d, generator=g)  # each batch's keys lean on the same few directions
    keys = [0.7 * shared + 0.7 * torch.randn(n, d, generator=g) for _ in range(batches)]
    targets = [torch.randn(n, d_out, generator=g) for _ in range(batches)]

    def run(refit: bool) -> tuple[float, float, tuple]:
        factors: list[tuple[torch.Tensor, torch.Tensor]] = []  # per batch: its own and its extra, side by side
        last: tuple = ()
        for b in range(batches):
            total = sum((uu @ vv.T for uu, vv in factors), torch.zeros(d_out, d))
            kp = torch.cat(keys[:b]) if b else None
            before = lack = None
            if b:
                before = (torch.cat([u for u, _ in factors], 1), torch.cat([v for _, v in factors], 1))
            if refit and b:  # each earlier key's absolute target less what it has now
                lack = torch.cat([targets[j] - keys[j] @ total.T for j in range(b)]).T
            solve = AlphaEditSolve(space, keys[b], kp, mu, lam)
            r = targets[b] - keys[b] @ total.T  # R: the target less what is there
            u, v = r.T, solve.factors()
            extra = solve.extra(before, lack)
            if extra is not None:
                u, v = torch.cat([u, extra[0]], 1), torch.cat([v, extra[1]], 1)
            factors.append((u, v))
            last = (solve, before, lack, kp, u, v, r)
        total = sum((uu @ vv.T for uu, vv in factors), torch.zeros(d_out, d))
        first = float((keys[0] @ total.T - targets[0]).norm() / targets[0].norm())
        final = float((keys[-1] @ total.T - targets[-1]).norm() / targets[-1].norm())
        return first, final, last

    first0, final0, _ = run(False)
    first1, final1, (solve, before, lack, kp, u, v, r) = run(True)
    q, cd = space.q.double(), c.double()
    jd = torch.cat([keys[-1], kp]).double().T
    m = q.T @ jd @ jd.T @ q + mu * torch.eye(space.kept, dtype=torch.float64) + lam * q.T @ cd @ q
    a = (u @ v.T).double() @ q
    past = (before[0] @ before[1].T).double()
    rhs = r.double().T @ keys[-1].double() @ q + lack.double() @ kp.double() @ q - lam * past @ cd @ q
    residual = float((a @ m - rhs).norm() / rhs.norm())
    print(
        f"\nnormal-equation residual {residual:.2e}; after {batches} batches with the pull-back the first batch's"
        f" misfit is {first0:.3f} kept as now, {first1:.3f} refitted; the last batch's {final0:.3f} / {final1:.3f}"
    )
    assert residual < 1e-4
    assert first1 < 0.7 * first0
    assert final1 < final0 + 0.1


def test_facts_sharing_a_key_are_one_unit() -> None:
    reqs = [
        EditRequest("Ana Bell attended", "Ana Bell", " Yale"),
        EditRequest("Ana Bell lives in the city of", "Ana Bell", " Oslo"),
        EditRequest("The home of Ana Bell is", "Ana Bell", " Rome"),
        EditRequest("Bo Diaz attended", "Bo Diaz", " Rice"),
    ]
    assert key_units(reqs) == [[0, 1], [2], [3]]


def _batch_records(session, n: int, seed: int) -> list[EvalCase]:
    world = session.fact_world()
    out = []
    for f, new in edit_cases(session, n, seed):
        out.append(
            EvalCase(
                f.prompt(0), new, f.subject, [f.prompt(f.held_out)], question=world.question(f.subject, f.prompt(0))
            )
        )
    return out


# measured on these 20 facts with the shipped fact world, by generation (teacher-forced):
# MEMIT Rel 0.90 (0.94), Para 0.50, Loc 1.00; AlphaEdit Rel 0.85 (0.85), Para 0.45, Loc 0.96
@pytest.mark.parametrize(("method", "rel", "para", "loc"), [("memit", 0.85, 0.4, 0.95), ("alphaedit", 0.8, 0.35, 0.9)])
def test_a_batch_edit_says_its_targets_keeps_the_rest_and_rolls_back_exactly(
    session, method: str, rel: float, para: float, loc: float
) -> None:
    cases = _batch_records(session, 20, 3)
    unrelated = [f.prompt(0) for f in session.fact_world().facts[-8:]]
    original = prompt_logits(session, unrelated + [c.prompt for c in cases[:4]])
    e = session.edit_batch(cases, method=method)
    g = e.probe.by_gen
    print(
        f"\n{method}, a batch of 20: {e.probe.summary()}; {e.seconds:.1f} s; residual left {e.info.residual_left:.2f}"
    )
    assert len(session.edits) == 1 and e.is_batch and len(e.facts) == 20
    assert g.rel >= rel and e.probe.rel >= rel  # the targets are now generated
    assert g.para >= para  # and in the held-out phrasing, which the model never saw for these facts
    assert g.loc >= loc and e.probe.loc >= loc  # unrelated prompts kept their answers
    with pytest.raises(KeditError, match="solved together"):
        session.rollback(f"{e.id}.3")
    assert len(session.edits) == 1
    session.rollback(e.id)
    assert all(
        torch.equal(a, b) for a, b in zip(prompt_logits(session, unrelated + [c.prompt for c in cases[:4]]), original)
    )
    assert earlier_keys(session.model, session.handle.adapter.mlp_out_name(1)) is None


def test_alphaedit_batches_in_sequence_keep_the_earlier_ones(session) -> None:
    """Three batches of 10, all measured after the last, then all rolled back exactly."""
    cases = _batch_records(session, 30, 4)
    edited = {c.subject for c in cases}
    kept = [f for f in session.fact_world().facts if f.subject not in edited][:24]
    others = [EvalCase(f.prompt(0), f.object, f.subject, true=f.object) for f in kept]
    result = edit_in_batches(session, cases, "alphaedit", 10, others=others)
    print(f"\nAlphaEdit, 30 facts in batches of 10: { {k: v for k, v in result.items() if k != 'seconds_per_batch'} }")
    assert result["batches"] == 3 and not session.edits and result["locality_prompts"] == 24
    by_batch = result["gen_rel_by_batch"]  # three batches of ten: their mean is the whole run's Rel
    assert len(by_batch) == 3 and abs(sum(by_batch) / 3 - result["gen_rel"]) < 1e-9
    # measured with the shipped fact world: Rel 0.70 (teacher-forced 0.75), Loc 0.92 (0.94)
    assert result["gen_rel"] >= 0.65 and result["tf_rel"] >= 0.7
    assert result["gen_loc"] >= 0.9 and result["tf_loc"] >= 0.9
    assert result["ppl_ratio"] <= 1.1
    assert result["rollback_exact"]


@pytest.mark.parametrize("option", ["pullback", "refit"])
def test_alphaedit_extra_change_on_a_model_is_carried_and_rolls_back(session, option: str) -> None:
    """With ``pullback`` (and the preservation term it needs) or ``refit``, the third of three
    batches carries, on each layer, factors beyond its own facts' (the take-back of the earlier
    batches' change there, or what the second batch moved at the first one's keys put back), the
    first batch none; rolling all back gives the unedited logits."""
    cases = _batch_records(session, 12, 4)
    probe = [c.prompt for c in cases]
    original = prompt_logits(session, probe)
    params = {"preserve": 0.3, option: True}
    made = [session.edit_batch(cases[i : i + 4], method="alphaedit", params=params, probe=False) for i in (0, 4, 8)]

    def units(batch: list[EvalCase]) -> int:
        return len(key_units([EditRequest(c.prompt, c.subject, c.target) for c in batch]))

    assert all(part.u.shape[1] == units(cases[:4]) for part in made[0].patch.parts)
    extra = [part.u.shape[1] - units(cases[8:]) for part in made[2].patch.parts]
    print(f"\nthe third batch's {option} factors per layer: {extra}")
    assert all(n > 0 for n in extra)
    for e in reversed(made):
        session.rollback(e.id)
    assert all(torch.equal(a, b) for a, b in zip(prompt_logits(session, probe), original))


def test_single_edit_methods_run_one_by_one_and_records_are_not_each_others_locality(session) -> None:
    """``--batch 1`` with ROME: single edits one after another, measured after the last. Records
    that are each other's locality (a real-facts file) are edited, so they are not counted as
    kept; with nothing else left, kedit.toml's locality prompts are. A batch size ROME cannot do
    is refused, and every edit is rolled back exactly."""
    cases = _batch_records(session, 4, 6)
    for c in cases:
        c.locality = [(o.prompt, o.target) for o in cases if o is not c]
    with pytest.raises(KeditError, match="one fact at a time"):
        edit_in_batches(session, cases, "rome", 2)
    result = edit_in_batches(session, cases, "rome", 1)
    print(f"\nROME, 4 facts one by one: { {k: v for k, v in result.items() if k != 'seconds_per_batch'} }")
    assert result["batches"] == 4 and len(result["seconds_per_batch"]) == 4 and not session.edits
    assert result["locality_prompts"] == len(session.locality(exclude={c.subject for c in cases}).prompts) > 0
    assert result["gen_rel"] >= 0.75 and result["tf_rel"] >= 0.75
    assert result["gen_loc"] >= 0.9
    assert (result["gen_loc"] == 1.0) == (not result["loc_lost"])  # what moved is named
    assert result["rollback_exact"]


def test_edit_file_command_and_saved_batches(session, tmp_path: Path) -> None:
    """/edit --file makes one ledger entry that /edits shows folded; /save and /load keep it exactly."""
    from kedit.engine import events as ev

    records = [
        {"prompt": c.prompt, "subject": c.subject, "target_new": c.target, "rephrase_prompt": c.rephrase[0]}
        for c in _batch_records(session, 8, 5)
    ]
    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    probe = [records[0]["prompt"], "Watts Humphrey attended"]
    original = prompt_logits(session, probe)
    out = list(session.run(f"/edit --file {facts} --method memit"))
    table = next(e for e in out if isinstance(e, ev.Table))
    assert "batch of 8" in table.title
    listed = next(e for e in session.run("/edits") if isinstance(e, ev.Table))
    assert len(listed.rows) == 1 and "batch of 8 fact(s)" in listed.rows[0][2]
    edited = prompt_logits(session, probe)
    saved = tmp_path / "s.kedit"
    list(session.run(f"/save {saved}"))
    session.undo()
    assert all(torch.equal(a, b) for a, b in zip(prompt_logits(session, probe), original))
    list(session.run(f"/load {saved}"))
    assert len(session.edits) == 1 and len(session.edits[0].facts) == 8
    assert all(torch.equal(a, b) for a, b in zip(prompt_logits(session, probe), edited))
    session.undo()
    assert all(torch.equal(a, b) for a, b in zip(prompt_logits(session, probe), original))
    refused = list(session.run(f"/edit --file {facts} --method rome"))
    assert isinstance(refused[-1], ev.Error) and "batch method" in refused[-1].message and not session.edits


def test_counterfact_records_are_read(tmp_path: Path) -> None:
    record = {
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English"},
            "target_true": {"str": "French"},
        },
        "paraphrase_prompts": ["Danielle Darrieux's mother tongue is"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    }
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([record]), encoding="utf-8")
    (case,) = read_cases(path)
    assert case.prompt == "The mother tongue of Danielle Darrieux is" and case.subject == "Danielle Darrieux"
    assert case.target == "English" and case.rephrase == ["Danielle Darrieux's mother tongue is"]
    assert case.locality == [("The mother tongue of Léon Blum is", "French")]


def test_insertion_set_is_fixed_and_well_formed() -> None:
    from kedit.engine.insertion import insertion_records

    a, b = insertion_records(30), insertion_records(30)
    assert a == b and len(a) == 30
    assert len({r["subject"] for r in a}) == 10  # three facts per person
    for r in a:
        assert r["subject"] in r["prompt"] and r["subject"] in r["rephrase_prompt"] and r["subject"] in r["question"]
        assert not r["rephrase_prompt"].startswith(r["subject"])
    # no namesakes: a key is the subject's last token, and a shared surname shares it
    people = list(dict.fromkeys(r["subject"] for r in insertion_records(1000)))
    assert len(people) == 334 and len({p.split()[-1] for p in people}) == 334


def test_alphaedit_null_space_on_the_fact_world(session) -> None:
    """On the fact world's real key statistics (no exact null space: a sample of real keys) the
    projection keeps under 3% of the energy of keys from the world's own sentences."""
    hp = session.method_params("alphaedit")
    layer = 0
    stats = key_stats(session.handle, layer, hp.stats_samples, hp.stats_tokens)
    space = null_space(stats.raw(), hp.null_threshold)
    rows = [f.sentence(0) for f in random.Random(0).sample(session.fact_world().facts, 40)]
    from kedit.engine.methods.rome.stats import layer_keys
    from kedit.engine.metrics import pad_right

    tok = session.tokenizer
    ids, mask = pad_right([tok(t)["input_ids"] for t in rows], tok.pad_token_id or 0, "cpu")
    keys = layer_keys(session.model, session.handle.adapter.mlp_out(layer), ids, mask)[mask.bool()].float()
    energy = float(space.project(keys.T).pow(2).sum() / keys.pow(2).sum())
    print(
        f"\nfact world layer {layer}: null space {space.kept} of {space.width}; ‖P k‖²/‖k‖² on its sentences {energy:.3f}"
    )
    assert space.kept > 0 and energy < 0.03


@pytest.fixture(scope="module")
def session_4bit(fact_world_dir):
    from kedit.engine.config import Config
    from kedit.engine.session import Session

    return Session.open(None, quant="4bit", config=Config.load(), show_progress=False)


from test_rome_fact_world import BNB_AVX512  # noqa: E402  (the same bitsandbytes caveat as ROME's)


@BNB_AVX512
@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_batches_on_a_4bit_load_leave_the_quantized_weights_alone(session_4bit, method: str) -> None:
    s = session_4bit
    modules = [s.handle.adapter.mlp_out(i) for i in (0, 1)]
    packed = [m.weight.data.clone() for m in modules]
    cases = _batch_records(s, 10, 6)
    probe = [c.prompt for c in cases[:3]] + ["Watts Humphrey attended"]
    original = prompt_logits(s, probe)
    e = s.edit_batch(cases, method=method)
    print(f"\n{method} on 4-bit, a batch of 10: {e.probe.summary()}")
    assert e.probe.by_gen.rel >= 0.8 and e.probe.loc >= 0.9
    assert all(torch.equal(m.weight.data, p) for m, p in zip(modules, packed))  # the NF4 bytes never change
    s.undo()
    assert all(torch.equal(a, b) for a, b in zip(prompt_logits(s, probe), original))


@pytest.mark.parametrize(
    "family", ["llama", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gptj", "gpt_neox", "llama:eager"]
)
def test_kept_prefix_passes_match_whole_rows(family: str) -> None:
    """The value's passes that keep each row's tokens before δ as an attention cache, with a
    group's rows packed into one masked sequence, give the log-probabilities and δ's gradient of
    whole-row passes, on rows of different lengths, in every family that keeps prefixes (and
    with eager attention, whose mask is additive)."""
    from tiny_models import build_tiny, char_tokenizer

    from kedit.engine.arch import ArchAdapter
    from kedit.engine.methods.reads import KeptPrefix, Reads, WholeRows, keeps_prefix

    family, _, attention = family.partition(":")
    model, tok = build_tiny(family), char_tokenizer()
    if attention:
        model.set_attn_implementation(attention)
    assert keeps_prefix(model)
    adapter = ArchAdapter.for_model(model)
    texts = [("Ann Lee went to", 6, " Yale"), ("Yes. Bo Diaz went to", 10, " Rice"), ("Cy is a", 2, " x")]
    rows, at, reads = [], [], Reads()
    for text, subject_end, target in texts:
        ids = tok(text)["input_ids"]
        target_ids = tok(target, add_special_tokens=False)["input_ids"]
        rows.append(ids + target_ids[:-1])
        at.append(subject_end)  # BOS then characters: the subject's last character
        for j in range(len(target_ids)):
            reads.at(len(rows) - 1, len(ids) - 1 + j)
    groups = [[0, 1, 2]]
    delta = torch.zeros(len(rows), adapter.hidden_size, requires_grad=True)
    results = []
    for runner in (
        KeptPrefix(model, tok, rows, at, groups, reads),
        KeptPrefix(model, tok, rows, at, groups, reads, adapter, 1),
        WholeRows(model, tok, rows, groups, reads, adapter, 1),
    ):
        where = runner.place(0, torch.tensor(at))

        def hook(mod, args, output, where=where):
            hidden = adapter.residual(output)
            moved = hidden.index_put(where, delta * 1.0, accumulate=True)
            return adapter.replace_residual(output, moved)

        handle = adapter.layer(1).register_forward_hook(hook)
        try:
            with runner.passes():
                for _ in range(2):  # the second pass replays the blocks below layer 1 where it can
                    ordered = runner.log_probs()
                    (grad,) = torch.autograd.grad(ordered[:, 5].sum(), delta)
                    results.append((ordered.detach(), grad))
        finally:
            handle.remove()
    a, ga = results[-1]
    for b, gb in results[:-1]:
        assert torch.allclose(a, b, atol=1e-4) and torch.allclose(ga, gb, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_runners_read_the_models_own_log_probs(family: str) -> None:
    """The runners project the reads of every group in one vocabulary matmul, outside the model's
    forward: what they give is the model's own log-softmax at those positions (Gemma 2's logit
    cap included), for any grouping and for a single group's ``run``."""
    from tiny_models import build_tiny, char_tokenizer

    from kedit.engine.methods.reads import Reads, WholeRows

    # a tiny random model's logits are small: a low cap is what makes it bend them
    capped = {"final_logit_softcapping": 0.05} if family == "gemma2" else {}
    model, tok = build_tiny(family, **capped), char_tokenizer()
    texts = ["Ann Lee went to Yale", "Bo went", "Cy is a cat"]
    rows = [tok(t)["input_ids"] for t in texts]
    reads = Reads()
    spots = [(0, 3), (2, 9), (1, 5), (0, 17), (2, 1)]
    for r, p in spots:
        reads.at(r, p)
    with torch.no_grad():
        own = torch.stack(
            [torch.log_softmax(model(input_ids=torch.tensor([rows[r]])).logits[0, p].float(), -1) for r, p in spots]
        )
        merged = WholeRows(model, tok, rows, [[0, 2], [1]], reads).log_probs()
        one = WholeRows(model, tok, rows, [[0, 1, 2]], reads)
        single, which = one.run(0)
    assert torch.allclose(merged, own, atol=1e-5)
    assert torch.allclose(single[torch.argsort(which)], own, atol=1e-5)


def test_sliding_window_models_run_whole_rows() -> None:
    from tiny_models import build_tiny

    from kedit.engine.methods.reads import keeps_prefix

    assert not keeps_prefix(build_tiny("gemma3_text"))


def test_shared_keys_flags_pairs_an_update_cannot_tell_apart() -> None:
    """Two keys that differ by a little noise reach each other almost fully; a third, orthogonal
    to them, reaches neither. Under C = I the reach is kᵢᵀkⱼ / ‖kⱼ‖²."""
    from kedit.engine.methods.rome.update import shared_keys

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, generator=g)
    near = a + 0.05 * torch.randn(64, generator=g)
    other = torch.randn(64, generator=g)
    other -= (other @ a) / (a @ a) * a
    keys = torch.stack([a, other, near])
    pairs = shared_keys(None, keys)
    assert [(i, j) for i, j, _ in pairs] == [(0, 2)]
    expected = min(float(a @ near / (near @ near)), float(near @ a / (a @ a)))
    assert pairs[0][2] == pytest.approx(expected, rel=1e-5) and pairs[0][2] > 0.95
    # with a C that makes the shared direction common, the same keys no longer collide
    c = torch.eye(64) + 1e6 * torch.outer(a, a) / (a @ a)
    assert shared_keys(c, keys) == []


def test_a_batch_with_namesakes_says_which_and_that_they_hold_one_value() -> None:
    from types import SimpleNamespace

    from kedit.engine.methods.memit.method import MemitInfo, MemitMethod

    info = MemitInfo(4, "m", layers=[4, 8], facts=6, shared=["Ann Smith / Bob Smith", "C Jones / D Jones"])
    text = MemitMethod().describe(SimpleNamespace(info=info))
    assert "2 pair(s) of subjects share most of their key (Ann Smith / Bob Smith, …)" in text
    assert "only one value" in text
    assert "share" not in MemitMethod().describe(SimpleNamespace(info=MemitInfo(4, "m", layers=[4, 8], facts=6)))
