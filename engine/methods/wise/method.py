"""WISE behind the EditMethod protocol."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kedit.engine.methods.base import Computed, EditContext, EditRequest, MethodDefaults, fmt, share_layer
from kedit.engine.methods.wise.memory import WisePatch, memories, memory
from kedit.engine.methods.wise.params import WiseParams
from kedit.engine.methods.wise.train import WiseInfo, train_edit


class WiseMethod(MethodDefaults):
    name = "wise"
    params = WiseParams
    info = WiseInfo
    lr_setting = "lr"

    def layer(self, ctx: EditContext, hp: WiseParams) -> int:
        return share_layer(ctx.handle, hp)

    def compute(self, ctx: EditContext, request: EditRequest, hp: WiseParams, layer: int, edit_id: str) -> Computed:
        irrelevant = [t for t in ctx.contexts(hp.n_irrelevant, hp.irrelevant_tokens) if t]
        patch, info = train_edit(ctx.handle, request, hp, layer, edit_id, irrelevant, ctx.progress)
        return Computed(patch, info)

    def describe(self, edit: Any) -> str:
        return f"side memory shard {edit.info.shard}"

    def save(self, edit: Any, put: Callable[[str, torch.Tensor], None]) -> dict[str, Any]:
        p: WisePatch = edit.patch
        put(f"{edit.id}.values", p.values)
        put(f"{edit.id}.inputs", p.edit_inputs)
        return {
            "module": p.mem.name,
            "wise": {
                "bank": p.bank,
                "shard": p.shard,
                "score": p.score,
                "shape": list(p.mem.shape),
                "dtype": str(p.mem.dtype),
            },
        }

    def restore(
        self,
        model: torch.nn.Module,
        record: dict[str, Any],
        module: torch.nn.Module,
        tensors: dict[str, torch.Tensor],
        pending: dict[str, Any],
    ) -> WisePatch:
        w, edit_id = record["wise"], record["id"]
        hp = WiseParams(**{k: v for k, v in record["hparams"].items() if k in WiseParams.__dataclass_fields__})
        mem = memory(model, module, record["module"], tuple(w["shape"]), getattr(torch, w["dtype"].split(".")[-1]), hp)
        patch = WisePatch(
            mem, edit_id, w["bank"], w["shard"], tensors[f"{edit_id}.values"], tensors[f"{edit_id}.inputs"], w["score"]
        )
        patch.apply()
        return patch

    def synthetic(self, handle: Any, hp: WiseParams, layer: int, i: int, g: torch.Generator) -> WisePatch:
        module, name = handle.adapter.mlp_out(layer), handle.adapter.mlp_out_name(layer)
        device = next(handle.model.parameters()).device
        d_in, d_out = handle.adapter.mlp_hidden_size, handle.adapter.hidden_size
        mem = memory(handle.model, module, name, (d_out, d_in), handle.dtype, hp)
        bank_i = mem.bank_for_new()
        bank = mem.bank(bank_i)
        shard = bank.next_shard()
        values = torch.randn(int(bank.shards[shard].mask.sum()), generator=g).to(device) * 1e-3
        inputs = torch.randn(4, d_in, generator=g).to(device)
        return WisePatch(mem, f"bench-wise-{i}", bank_i, shard, values, inputs)

    def state(self, model: torch.nn.Module) -> list[str]:
        lines = []
        for mem in memories(model).values():
            if mem.scores:
                st = mem.state()
                thresholds = ", ".join(fmt(t) for t in st["thresholds"])
                lines.append(
                    f"WISE on {st['module']}: {st['side memories']} side memor"
                    f"{'y' if st['side memories'] == 1 else 'ies'}, edits per shard {st['edits per shard']}, "
                    f"routing thresholds {thresholds}; share of positions routed to a side memory "
                    f"{fmt(st['routed share'])}"
                )
        return lines


METHOD = WiseMethod()
