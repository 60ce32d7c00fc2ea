"""GRACE's codebook and WISE's side memory, on small synthetic modules: the mechanics each
paper describes, and exact reversal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kedit.engine.merging import ties_merge
from kedit.engine.methods.grace.codebook import GraceCodebook, GracePatch, place
from kedit.engine.methods.grace.params import GraceParams
from kedit.engine.methods.wise.memory import Bank, WiseMemory, WisePatch
from kedit.engine.methods.wise.params import WiseParams

HP = GraceParams(eps_init=1.0)


def _book() -> tuple[nn.Linear, GraceCodebook]:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    return layer, GraceCodebook(layer, "layer")


def _edit(book: GraceCodebook, key: list[float], label: tuple[int, ...], edit_id: str, fill: float):
    layers, action, radius = place(book, torch.tensor(key), label, edit_id, HP, lambda: torch.full((3,), fill))
    patch = GracePatch(book, edit_id, layers)
    patch.apply()
    return patch, action, radius


def test_grace_adds_then_expands_a_covered_key_with_the_same_label() -> None:
    _, book = _book()
    _, action, radius = _edit(book, [0.0, 0, 0, 0], (5,), "e1", 1.0)
    assert (action, radius) == ("added", 1.0)
    # 1.5 away: within ε_k + ε_init = 2, same label -> the radius grows to 1.5, no new key
    _, action, radius = _edit(book, [1.5, 0, 0, 0], (5,), "e2", 2.0)
    assert (action, radius) == ("expanded", 1.5)
    assert len(book.entries) == 1 and book.entries[0].top.radius == 1.5
    assert torch.equal(book.entries[0].top.value, torch.full((3,), 1.0))  # the value is kept


def test_grace_splits_radii_when_labels_conflict_and_rollback_restores_them() -> None:
    _, book = _book()
    _edit(book, [0.0, 0, 0, 0], (5,), "e1", 1.0)
    patch, action, radius = _edit(book, [1.2, 0, 0, 0], (7,), "e2", 2.0)
    assert action == "split"
    assert [e.top.radius for e in book.entries] == pytest.approx([0.6, 0.6])
    assert [e.top.label for e in book.entries] == [(5,), (7,)]
    patch.revert()
    assert len(book.entries) == 1 and book.entries[0].top.radius == 1.0


def test_grace_labels_compare_as_token_sequences_not_by_mean() -> None:
    _, book = _book()
    _edit(book, [0.0, 0, 0, 0], (2, 4), "e1", 1.0)
    _, action, _ = _edit(book, [0.5, 0, 0, 0], (3, 3), "e2", 2.0)  # same mean, different answer
    assert action == "split"


def test_grace_replaces_only_within_radius_per_position_and_carries_nothing_between_calls() -> None:
    layer, book = _book()
    _edit(book, [0.0, 0, 0, 0], (5,), "e1", 9.0)
    x = torch.tensor([[[0.1, 0, 0, 0], [3.0, 0, 0, 0]]])  # one near the key, one far
    plain = layer(x).detach()
    out = layer(x).detach()
    assert torch.equal(out[0, 0], torch.full((3,), 9.0)) and torch.equal(out[0, 1], plain[0, 1])
    far = torch.tensor([[[3.0, 0, 0, 0]]])  # a later call, like one cached decode step
    assert torch.equal(layer(far), nn.functional.linear(far, layer.weight, layer.bias))


def test_grace_rollback_in_any_order_empties_the_codebook_and_removes_the_hook() -> None:
    layer, book = _book()
    x = torch.randn(2, 5, 4)
    before = layer(x).detach()
    patches = [_edit(book, [float(i), 0, 0, 0], (i % 2,), f"e{i}", float(i))[0] for i in range(5)]
    for p in (patches[2], patches[0], patches[4], patches[1], patches[3]):
        p.revert()
    assert not book.entries and not layer._forward_hooks
    assert torch.equal(layer(x), before)


def test_ties_merge_keeps_disjoint_entries_elects_signs_and_averages_agreement() -> None:
    a = torch.tensor([1.0, 0.0, 2.0, -1.0])
    b = torch.tensor([0.0, 3.0, 4.0, 2.0])
    merged = ties_merge([a, b], density=1.0)
    # entry 3: signs -1 and +2 sum to +1, so only b agrees
    assert torch.equal(merged, torch.tensor([1.0, 3.0, 3.0, 2.0]))


def _memory(**kw) -> tuple[nn.Linear, WiseMemory]:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    hp = WiseParams(n_shards=2, mask_ratio=0.5, act_ratio=0.9, **kw)
    return layer, WiseMemory(layer, "layer", (4, 6), torch.device("cpu"), torch.float32, hp)


def _wise_edit(mem: WiseMemory, edit_id: str, key: torch.Tensor, scale: float) -> WisePatch:
    bank_i = mem.bank_for_new()
    bank = mem.bank(bank_i)
    shard = bank.next_shard()
    mask = bank.shards[shard].mask
    change = torch.outer(torch.ones(4), key) * scale * mask
    patch = WisePatch(mem, edit_id, bank_i, shard, change[mask], key[None])
    patch.apply()
    return patch


def test_wise_routes_the_edit_to_the_side_memory_and_unrelated_inputs_to_the_main_one() -> None:
    layer, mem = _memory()
    key = torch.tensor([1.0, 0, 0, 0, 0, 0])
    _wise_edit(mem, "e1", key, 3.0)
    bank = mem.banks[0]
    assert bank.threshold == 0.9 * float(bank.score(key[None]))
    unrelated = torch.tensor([[0.0, 0, 0, 0, 0, 1.0], [0.0, 0.1, 0, 0, 0, 0]])
    with torch.no_grad():
        plain = nn.functional.linear(unrelated, layer.weight, layer.bias)
        assert torch.equal(layer(unrelated), plain)  # below the threshold: the main memory, exactly
        edited = layer(key[None])
        assert torch.allclose(edited, nn.functional.linear(key[None], layer.weight, layer.bias) + key[None] @ bank.d.T)
    assert mem.routed == 1


def test_wise_reverting_the_latest_edit_restores_the_side_memory_bit_for_bit() -> None:
    layer, mem = _memory()
    keys = torch.eye(6)
    _wise_edit(mem, "e1", keys[0], 2.0)
    _wise_edit(mem, "e2", keys[1], 3.0)
    d, thr = mem.banks[0].d.clone(), mem.banks[0].threshold
    p3 = _wise_edit(mem, "e3", keys[2], 0.7)
    p3.revert()
    assert torch.equal(mem.banks[0].d, d) and mem.banks[0].threshold == thr
    # an earlier edit out: its recorded change goes, the others stay
    mem.remove("e1")
    assert set(mem.scores) == {"e2"}


def test_wise_new_side_memories_open_when_full_and_the_newest_claims_first() -> None:
    layer, mem = _memory(edits_per_memory=1)
    keys = torch.eye(6)
    _wise_edit(mem, "e1", keys[0], 2.0)
    _wise_edit(mem, "e2", keys[1], 3.0)
    assert len(mem.banks) == 2
    x = torch.randn(3, 6)
    mem.remove("e2")
    mem.remove("e1")
    assert not mem.banks and not layer._forward_hooks
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_bank_scores_are_norms_of_d_x() -> None:
    bank = Bank((2, 3), torch.device("cpu"), torch.float32, WiseParams(n_shards=1, mask_ratio=1.0))
    bank.add("e1", 0, torch.arange(6, dtype=torch.float32), torch.ones(1, 3))
    assert torch.equal(bank.d, torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert float(bank.score(torch.ones(1, 3))) == float(torch.tensor([3.0, 12.0]).norm())


def test_several_side_memories_route_each_position_to_the_newest_that_claims_it() -> None:
    """With one side memory per edit (WISE-Retrieve), all memories are computed in one product;
    each position still gets exactly the newest claiming memory's output, as a loop gives it."""
    from torch import nn

    from kedit.engine.methods.wise.memory import WiseMemory
    from kedit.engine.methods.wise.params import WiseParams

    torch.manual_seed(0)
    module = nn.Linear(8, 6)
    mem = WiseMemory(module, "m", (6, 8), torch.device("cpu"), torch.float32, WiseParams(edits_per_memory=1))
    inputs = [torch.randn(2, 8) * 3 for _ in range(3)]
    for i, x in enumerate(inputs):
        mask = mem.bank(i).shards[0].mask
        mem.add(f"e{i}", i, 0, torch.randn(int(mask.sum())), x)
    assert len(mem.banks) == 3 and mem._handle is not None
    x = torch.cat([torch.cat(inputs), torch.randn(4, 8) * 0.01])[None]  # edits' inputs, then quiet ones
    with torch.no_grad():
        got = module(x)
        plain = x @ module.weight.T + module.bias
        want, free, claimed = plain.clone(), torch.ones(x.shape[:-1], dtype=torch.bool), 0
        for bank in reversed(mem.banks):
            side = x @ bank.d.T
            claim = (side.norm(dim=-1) > bank.threshold) & free
            want[claim] += side[claim]
            free &= ~claim
            claimed += int(claim.sum())
    assert claimed >= 6 and bool(free[0, -4:].all())  # every edit input is claimed, quiet ones are not
    assert torch.allclose(got, want, atol=1e-5)
    assert mem.routed == claimed and mem.positions == x.shape[1]
