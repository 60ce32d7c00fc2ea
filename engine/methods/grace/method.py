"""GRACE behind the EditMethod protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kedit.engine.methods.base import Computed, EditContext, EditRequest, MethodDefaults, MethodInfo, fmt, share_layer
from kedit.engine.methods.grace.codebook import Entry, GracePatch, Revision, codebook, codebooks, place
from kedit.engine.methods.grace.params import GraceParams
from kedit.engine.methods.grace.value import key_and_output, train_value


@dataclass
class GraceInfo(MethodInfo):
    key_distance: float = float("inf")  # to the nearest key already in the codebook
    action: str = ""  # added, expanded, split or replaced
    radius: float = 0.0


class GraceMethod(MethodDefaults):
    name = "grace"
    params = GraceParams
    info = GraceInfo
    lr_setting = "lr"

    def layer(self, ctx: EditContext, hp: GraceParams) -> int:
        return share_layer(ctx.handle, hp)

    def compute(self, ctx: EditContext, request: EditRequest, hp: GraceParams, layer: int, edit_id: str) -> Computed:
        handle, progress = ctx.handle, ctx.progress
        model, tok, adapter = handle.model, handle.tokenizer, handle.adapter
        module, name = adapter.mlp_out(layer), adapter.mlp_out_name(layer)
        book = codebook(model, module, name)
        key, out = key_and_output(model, tok, module, request.prompt)
        label = tuple(tok(request.target, add_special_tokens=False)["input_ids"])
        _, d = book.nearest(key)
        info = GraceInfo(layer, name, key_distance=d)

        def tick(step: int, nll: float) -> None:
            if progress:
                progress("training the GRACE value", step, hp.n_iter)

        def value() -> torch.Tensor:
            v, info.nll_before, info.nll_after, info.value_steps = train_value(
                model, tok, module, request.prompt, request.target, out, hp, tick, adapter=adapter, layer=layer
            )
            return v

        revisions, info.action, info.radius = place(book, key, label, edit_id, hp, value)
        return Computed(GracePatch(book, edit_id, revisions), info)

    def describe(self, edit: Any) -> str:
        return f"codebook entry {edit.info.action or '?'}, radius {edit.info.radius:.3g}"

    def save(self, edit: Any, put: Callable[[str, torch.Tensor], None]) -> dict[str, Any]:
        p: GracePatch = edit.patch
        order = {id(entry): i for i, entry in enumerate(p.book.entries)}
        put(f"grace:{p.book.name}.keys", torch.stack([entry.key for entry in p.book.entries]))
        revisions = []
        for j, (entry, revision) in enumerate(p.revisions):
            put(f"{edit.id}.value{j}", revision.value)
            revisions.append({"entry": order[id(entry)], "radius": revision.radius, "label": list(revision.label)})
        return {"module": p.book.name, "grace": revisions, "entries": len(p.book.entries)}

    def restore(
        self,
        model: torch.nn.Module,
        record: dict[str, Any],
        module: torch.nn.Module,
        tensors: dict[str, torch.Tensor],
        pending: dict[str, Any],
    ) -> GracePatch:
        name, edit_id = record["module"], record["id"]
        entries = pending.setdefault(name, [Entry(k) for k in tensors[f"grace:{name}.keys"]])
        revisions = [
            (entries[g["entry"]], Revision(edit_id, g["radius"], tensors[f"{edit_id}.value{j}"], tuple(g["label"])))
            for j, g in enumerate(record["grace"])
        ]
        patch = GracePatch(codebook(model, module, name), edit_id, revisions)
        patch.adopt()
        return patch

    def finish_restore(
        self, model: torch.nn.Module, modules: dict[str, torch.nn.Module], pending: dict[str, Any]
    ) -> None:
        for name, entries in pending.items():
            codebook(model, modules[name], name).restore(entries)

    def synthetic(self, handle: Any, hp: GraceParams, layer: int, i: int, g: torch.Generator) -> GracePatch:
        module, name = handle.adapter.mlp_out(layer), handle.adapter.mlp_out_name(layer)
        device = next(handle.model.parameters()).device
        # a random key is far (about √d_in) from every real input: unrelated text never hits it
        entry = Entry(torch.randn(handle.adapter.mlp_hidden_size, generator=g).to(device))
        revision = Revision(
            f"bench-grace-{i}", hp.eps_init, torch.randn(handle.adapter.hidden_size, generator=g).to(device), (i,)
        )
        return GracePatch(codebook(handle.model, module, name), revision.edit_id, [(entry, revision)])

    def state(self, model: torch.nn.Module) -> list[str]:
        lines = []
        for book in codebooks(model).values():
            if book.entries:
                st = book.state()
                lines.append(
                    f"GRACE on {st['module']}: {st['entries']} codebook entries, radius min "
                    f"{fmt(st['radius min'])} / median {fmt(st['radius median'])} / max "
                    f"{fmt(st['radius max'])}; {st['positions replaced']} positions answered from it"
                )
        return lines


METHOD = GraceMethod()
