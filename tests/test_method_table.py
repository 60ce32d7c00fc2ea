"""A method is one package and one line in METHODS: a toy method registered in a test gets
/edit --method, /edits, save and load, rollback and the bench from the engine, unchanged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from kedit.engine import events as ev
from kedit.engine.methods.base import (
    Computed,
    EditContext,
    EditRequest,
    MethodDefaults,
    MethodInfo,
    MethodParams,
    share_layer,
)
from kedit.engine.methods.table import METHODS
from kedit.engine.patches import TogglePatch


@dataclass(frozen=True)
class NudgeParams(MethodParams):
    section = "nudge"
    layer: int | None = None
    layer_share: float = 0.5
    scale: float = 4.0


class NudgePatch(TogglePatch):
    """Adds a fixed vector to one module's output at every position."""

    def __init__(self, module: torch.nn.Module, name: str, key: str, vector: torch.Tensor) -> None:
        self.module, self.name, self.key, self.vector = module, name, key, vector
        self._hook: Any = None

    def _apply(self) -> None:
        self._hook = self.module.register_forward_hook(lambda m, a, out: out + self.vector.to(out.dtype))

    def _revert(self) -> None:
        self._hook.remove()


class NudgeMethod(MethodDefaults):
    """Pushes one MLP's output toward the target's first token's output embedding."""

    name = "nudge"
    params = NudgeParams
    info = MethodInfo
    lr_setting = "scale"

    def layer(self, ctx: EditContext, hp: NudgeParams) -> int:
        return share_layer(ctx.handle, hp)

    def compute(self, ctx: EditContext, request: EditRequest, hp: NudgeParams, layer: int, edit_id: str) -> Computed:
        h = ctx.handle
        token = h.tokenizer(request.target, add_special_tokens=False)["input_ids"][0]
        row = h.model.get_output_embeddings().weight[token].detach().float()
        vector = hp.scale * row / row.norm()
        module, name = h.adapter.mlp_out(layer), h.adapter.mlp_out_name(layer)
        return Computed(NudgePatch(module, name, edit_id, vector), MethodInfo(layer, name))

    def describe(self, edit: Any) -> str:
        return f"nudged {edit.patch.name}"

    def save(self, edit: Any, put: Callable[[str, torch.Tensor], None]) -> dict[str, Any]:
        put(f"{edit.id}.vector", edit.patch.vector)
        return {"module": edit.patch.name}

    def restore(
        self,
        model: torch.nn.Module,
        record: dict[str, Any],
        module: torch.nn.Module,
        tensors: dict[str, torch.Tensor],
        pending: dict[str, Any],
    ) -> NudgePatch:
        patch = NudgePatch(module, record["module"], record["id"], tensors[f"{record['id']}.vector"])
        patch.apply()
        return patch

    def synthetic(self, handle: Any, hp: NudgeParams, layer: int, i: int, g: torch.Generator) -> NudgePatch:
        module, name = handle.adapter.mlp_out(layer), handle.adapter.mlp_out_name(layer)
        return NudgePatch(module, name, f"bench-nudge-{i}", torch.randn(handle.adapter.hidden_size, generator=g))


@pytest.fixture
def nudge():
    METHODS["nudge"] = NudgeMethod()
    try:
        yield
    finally:
        del METHODS["nudge"]


def _logits(session) -> torch.Tensor:
    ids = session.tokenizer("Watts Humphrey attended", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return session.model(ids).logits


def test_a_registered_method_gets_every_command_for_free(session, nudge, tmp_path) -> None:
    before = _logits(session)
    out = list(session.run('/edit "Watts Humphrey attended" -> "University of Michigan" --method nudge --layer 3'))
    table = out[-1]
    assert isinstance(table, ev.Table), out
    assert "NUDGE at layer 3" in table.title and "nudged model.layers.3.mlp.down_proj" in table.title
    edited = _logits(session)
    assert not torch.equal(edited, before)
    listing = list(session.run("/edits"))[0]
    assert isinstance(listing, ev.Table) and listing.rows[0][1] == "nudge"

    path = tmp_path / "nudged.kedit"
    assert isinstance(list(session.run(f"/save {path}"))[0], ev.Info)
    assert isinstance(list(session.run("/undo"))[0], ev.Info)
    assert torch.equal(_logits(session), before)
    loaded = list(session.run(f"/load {path}"))
    assert not any(isinstance(e, ev.Error) for e in loaded), loaded
    assert torch.equal(_logits(session), edited) and session.edits[0].method == "nudge"
    assert session.edits[0].info.module == "model.layers.3.mlp.down_proj"
    (msg,) = list(session.run(f"/rollback {session.edits[0].id}"))
    assert isinstance(msg, ev.Info) and torch.equal(_logits(session), before)

    unknown = list(session.run('/edit "Watts Humphrey attended" -> Yale --method nope'))
    assert isinstance(unknown[0], ev.Error) and "nudge" in unknown[0].message


def test_the_bench_measures_a_registered_method(session, nudge) -> None:
    from kedit.engine.bench import BenchPlan, run_bench

    before = _logits(session)
    plan = BenchPlan(
        methods=("nudge",), edit_repeats=1, vectors=(), active=(2,), new_tokens=4, prompt_tokens=6, repeats=1
    )
    report = run_bench(session, plan)
    assert report["edits"]["nudge"]["edit"] > 0 and report["edits"]["nudge"]["rollback"] >= 0
    assert [c["label"] for c in report["generation"]["conditions"]] == ["nudge × 2"]
    assert torch.equal(_logits(session), before) and not session.edits
