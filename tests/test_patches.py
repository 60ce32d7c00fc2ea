"""Low-rank sidecar patches: exact arithmetic, exact removal, in any order."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kedit.engine.methods.rome.update import c_inverse_k, rank_one, spread_direction, update_direction
from kedit.engine.patches import LowRankPatch, sidecar, sidecars


def _layer(seed: int = 0) -> tuple[nn.Module, nn.Linear]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    return model, model[2]


def _second_moment(seed: int, n: int, d: int) -> torch.Tensor:
    """C = E[k kᵀ] of n random d-wide keys."""
    torch.manual_seed(seed)
    keys = torch.randn(n, d)
    return keys.T @ keys / n


def test_rank_one_update_moves_the_key_by_delta_exactly() -> None:
    c = _second_moment(0, 500, 16)
    k_star, delta = torch.randn(16), torch.randn(8)
    cinv_k = c_inverse_k(c, k_star, ridge=0.0)
    u, v = rank_one(delta, update_direction(k_star, cinv_k), torch.float32)
    assert torch.allclose((u @ v.T) @ k_star, delta, atol=1e-4)
    # C⁻¹k* really solves C x = k*
    assert torch.allclose(c @ cinv_k, k_star, atol=1e-3)
    # C = I fallback: v is k* / ‖k*‖²
    u_i, v_i = rank_one(delta, update_direction(k_star, c_inverse_k(None, k_star, 0.0)), torch.float32)
    assert torch.allclose(v_i[:, 0], k_star / k_star.pow(2).sum())


def test_spread_direction_fires_on_its_keys_leaves_neighbours_alone_and_is_rome_for_one_key() -> None:
    c = _second_moment(2, 600, 32)
    k_star = torch.randn(32)
    rome = update_direction(k_star, c_inverse_k(c, k_star, 0.01))
    assert torch.allclose(spread_direction(c, k_star[None], None, 10.0, 0.01), rome, atol=1e-5)
    keys, near = torch.randn(2, 32), torch.randn(5, 32)
    loose = spread_direction(c, keys, None, 10.0, 0.01)
    tight = spread_direction(c, keys, near, 1e4, 0.01)
    for d in (loose, tight):
        assert torch.allclose(keys @ d, torch.ones(2), atol=1e-3)  # the whole of δ on every key of its own
    assert (near @ tight).abs().max() < 0.02 < (near @ loose).abs().max()  # and next to none on neighbours
    # the neighbours' weight is a share of C's corpus, solved by Woodbury: check against a direct solve
    shrunk = c.double() + 0.01 * c.diagonal().mean().double() * torch.eye(32, dtype=torch.float64)
    a = shrunk + 3.0 * near.double().T @ near.double() / 5
    ak = torch.linalg.solve(a, keys.double().T)
    direct = ak @ torch.linalg.solve(keys.double() @ ak, torch.ones(2, 1, dtype=torch.float64))
    assert torch.allclose(spread_direction(c, keys, near, 3.0, 0.01).double(), direct[:, 0], atol=1e-4)
    # shares: the first key gets all of δ, the second none (the opening key beside the edited one)
    only_first = spread_direction(c, keys, near, 3.0, 0.01, shares=torch.tensor([1.0, 0.0]))
    assert torch.allclose(keys @ only_first, torch.tensor([1.0, 0.0]), atol=1e-4)


def test_c_inverse_k_factors_c_once_and_solves_every_key_with_it() -> None:
    from kedit.engine.methods.rome.update import FactorCache

    cache = FactorCache()
    c = _second_moment(1, 400, 24)
    first, second = torch.randn(24), torch.randn(24)
    x = c_inverse_k(c, first, ridge=0.1, cache=cache)
    factor = cache.factor
    y = c_inverse_k(c, second, ridge=0.1, cache=cache)
    assert cache.factor is factor  # the same C and ridge: no second factoring
    shrunk = c.double() + 0.1 * c.diagonal().mean().double() * torch.eye(24, dtype=torch.float64)
    for k, got in ((first, x), (second, y)):
        assert torch.allclose(got.double(), torch.linalg.solve(shrunk, k.double()), atol=1e-6)
    c_inverse_k(c, first, ridge=0.2, cache=cache)
    assert cache.factor is not factor  # another ridge is another matrix
    with pytest.raises(FloatingPointError, match="not positive definite"):
        c_inverse_k(-torch.eye(24), first, ridge=0.0)


def test_sidecar_adds_u_v_x_and_removal_restores_bit_for_bit() -> None:
    model, layer = _layer()
    x = torch.randn(3, 8)
    before = model(x)
    u, v = torch.randn(8, 1), torch.randn(16, 1)
    hidden = model[1](model[0](x))
    patch = LowRankPatch(sidecar(model, layer, "2"), "e1", u, v)
    patch.apply()
    assert torch.allclose(model(x), before + (hidden @ v) @ u.T, atol=1e-5)
    assert sidecars(model)["2"].rank == 1
    patch.revert()
    assert torch.equal(model(x), before)
    assert not layer._forward_hooks  # no hook left behind


def test_sidecar_of_high_rank_adds_one_product_and_removal_restores_bit_for_bit() -> None:
    """Past the rank where x (V Uᵀ) is cheaper than (x V) Uᵀ the sidecar adds the product: the
    same change to float rounding, and taking the wide edit out gives back exactly the narrow
    state before it."""
    model, layer = _layer(2)
    x = torch.randn(5, 8)
    original = model(x)
    hidden = model[1](model[0](x))
    narrow = LowRankPatch(sidecar(model, layer, "2"), "e1", torch.randn(8, 2), torch.randn(16, 2))
    narrow.apply()
    before_wide = model(x)
    u, v = torch.randn(8, 9), torch.randn(16, 9)  # rank 11 in all: 11 · (8 + 16) > 8 · 16
    wide = LowRankPatch(sidecar(model, layer, "2"), "e2", u, v)
    wide.apply()
    side = sidecars(model)["2"]
    assert side.rank == 11 and side._dense is not None
    assert torch.allclose(model(x), before_wide + (hidden @ v) @ u.T, atol=1e-4)
    wide.revert()
    assert side._dense is None and torch.equal(model(x), before_wide)
    narrow.revert()
    assert torch.equal(model(x), original) and not layer._forward_hooks


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.randoms(use_true_random=False))
def test_any_order_of_removal_restores_the_original(n: int, rnd: random.Random) -> None:
    model, layer = _layer(1)
    x = torch.randn(4, 8)
    original = model(x)
    patches = []
    states = [original]
    for i in range(n):
        p = LowRankPatch(sidecar(model, layer, "2"), f"e{i}", torch.randn(8, 1), torch.randn(16, 1))
        p.apply()
        patches.append(p)
        states.append(model(x))
    # taking out the latest restores the state before it, exactly
    patches[-1].revert()
    assert torch.equal(model(x), states[-2])
    patches[-1].apply()
    order = list(range(n))
    rnd.shuffle(order)
    for i in order:
        patches[i].revert()
    assert torch.equal(model(x), original)
    assert not layer._forward_hooks
