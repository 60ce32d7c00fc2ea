"""MEMIT and AlphaEdit end to end, behind the EditMethod protocol: values, then layer by layer
keys, residual and solve, as one patch of low-rank factors on every layer of the range."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kedit.engine.errors import KeditError
from kedit.engine.methods.base import (
    Computed,
    EditContext,
    EditRequest,
    MethodDefaults,
    MethodInfo,
    check_layer,
    synthetic_factors,
)
from kedit.engine.methods.memit.keys import fact_keys, residuals
from kedit.engine.methods.memit.params import AlphaEditParams, MemitParams
from kedit.engine.methods.memit.solve import AlphaEditSolve, NullSpace, memit_factors, null_space
from kedit.engine.methods.memit.values import compute_targets
from kedit.engine.methods.rome.key import context_templates
from kedit.engine.methods.rome.stats import KeyStats, key_stats
from kedit.engine.methods.rome.update import FactorCache, shared_keys
from kedit.engine.patches import LowRankPatch, TogglePatch, all_attached, attached, sidecar, sidecars

KEYS_KIND = "alphaedit_keys"  # per module: the keys of each AlphaEdit batch in force, by edit id


@dataclass
class MemitInfo(MethodInfo):
    layers: list[int] = field(default_factory=list)
    facts: int = 0
    stats_source: str = ""
    residual_left: float = 0.0  # mean ‖z - h‖ after the update over ‖z - h‖ before it
    null_dims: list[int] = field(default_factory=list)  # AlphaEdit: the null space's size per layer
    # subjects of the batch whose keys at the range's first layer are too alike to hold different
    # values (rome.update.shared_keys), as "A / B"
    shared: list[str] = field(default_factory=list)


class BatchPatch(TogglePatch):
    """One batch's factors on each layer of its range and, for AlphaEdit, its keys in the registry
    later batches read. Applied bottom-up, reverted top-down; each part's revert is exact."""

    def __init__(self, parts: Sequence[LowRankPatch], model: torch.nn.Module, keys: dict[str, torch.Tensor]) -> None:
        self.parts = list(parts)
        self.model = model
        self.keys = keys  # module name -> (n, d_in), or empty
        self.key = self.parts[0].key if self.parts else ""

    def _table(self, name: str) -> OrderedDict[str, torch.Tensor]:
        table: OrderedDict[str, torch.Tensor] = attached(self.model, KEYS_KIND, name, OrderedDict)
        return table

    def _apply(self) -> None:
        done: list[LowRankPatch] = []
        try:
            for part in self.parts:
                part.apply()
                done.append(part)
        except BaseException:
            for part in reversed(done):
                part.revert()
            raise
        for name, k in self.keys.items():
            self._table(name)[self.key] = k

    def _revert(self) -> None:
        for name in self.keys:
            self._table(name).pop(self.key, None)
        for part in reversed(self.parts):
            part.revert()


def key_units(requests: Sequence[EditRequest]) -> list[list[int]]:
    """The requests grouped by their words up to the subject's last occurrence: those share
    their key at every layer (attention is causal), so they are solved as one."""
    units: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        units.setdefault(r.prompt[: r.prompt.rindex(r.subject) + len(r.subject)], []).append(i)
    return list(units.values())


def earlier_keys(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The keys of the AlphaEdit batches in force on module ``name``, as rows."""
    table = all_attached(model, KEYS_KIND).get(name) or {}
    return torch.cat(list(table.values())) if table else None


def earlier_change(model: torch.nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The factors (U, V) of the AlphaEdit batches in force on module ``name``, side by side:
    their change there is U Vᵀ. None if there are none."""
    table = all_attached(model, KEYS_KIND).get(name) or {}
    side = sidecars(model).get(name)
    if not table or side is None:
        return None
    parts = [side.factors[eid] for eid in table if eid in side.factors]
    if not parts:
        return None
    return torch.cat([u for u, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)


def earlier_shortfall(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    """For the keys of each AlphaEdit batch in force on module ``name`` (rows in ``earlier_keys``'
    order), what they still lack of the change their own batch set out to give them there: that
    batch's target share r (its U's first columns, one per key) less Σ U Vᵀ k over the factors
    from that batch on. Columns (d_out, p); None if there are no such keys."""
    table = all_attached(model, KEYS_KIND).get(name) or {}
    side = sidecars(model).get(name)
    if not table or side is None:
        return None
    order = list(side.factors)
    columns = []
    for eid, k in table.items():
        own = side.factors[eid][0]
        lack = own[:, : k.shape[0]].T.to(k.device, torch.float64, copy=True)  # the shares r, (n, d_out)
        for e in order[order.index(eid) :]:
            u, v = side.factors[e]
            lack -= (k.double() @ v.double().to(k.device)) @ u.double().T.to(k.device)
        columns.append(lack)
    return torch.cat(columns).T


class MemitMethod(MethodDefaults):
    name = "memit"
    params: Any = MemitParams
    info = MemitInfo
    exports = True
    batches = True
    lr_setting = "v_lr"
    bench_layer_share = 0.2
    timing_steps = ("values", "keys", "solve")
    keeps_keys = False  # whether later batches are solved to keep this one's keys (AlphaEdit)

    def layer(self, ctx: EditContext, hp: MemitParams) -> int:
        """The top of the range: ``layer`` (--layer), else the last of ``layers``, else
        ``span - 1 - below`` above the causal-tracing choice (ROME's, cached per model)."""
        from kedit.engine.trace import best_edit_layer, cached_edit_layer

        n = ctx.handle.adapter.n_layers
        if hp.layer is not None:
            return check_layer(ctx.handle, hp.layer)
        if hp.layers is not None:
            if not hp.layers:
                raise KeditError(f"{self.name}.layers is empty: name the layers to edit, or leave it out")
            for i in hp.layers:
                check_layer(ctx.handle, int(i))
            return max(int(i) for i in hp.layers)
        h = ctx.handle

        def trace() -> int:
            return best_edit_layer(h.model, h.tokenizer, h.adapter, ctx.trace_cases())[0]

        traced = cached_edit_layer(h, "rome", trace)
        return min(n - 1, max(0, traced - hp.below) + hp.span - 1)

    # -- the statistics and the solve, per layer ----------------------------------------------

    def _stats(self, ctx: EditContext, hp: MemitParams, layer: int) -> KeyStats | None:
        if hp.identity_c:
            return None
        return key_stats(ctx.handle, layer, hp.stats_samples, hp.stats_tokens, ctx.stats_corpus, ctx.progress)

    def _factors(
        self, ctx: EditContext, hp: MemitParams, layer: int, keys: torch.Tensor, stats: KeyStats | None
    ) -> tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor] | None]:
        """V (d_in, n) for this layer, the null space's size (0: none), and factors (U, V) of
        any further change the batch makes there besides its own facts' (None: none)."""
        cache = ctx.handle.caches.setdefault("rome.factor", FactorCache())
        weight = hp.update_weight * keys.shape[1]
        return memit_factors(stats.c if stats else None, keys, weight, cache), 0, None

    def prepare(self, ctx: EditContext, hp: MemitParams, layer: int) -> dict[str, Any]:
        if hp.identity_c:
            return {}
        started = time.perf_counter()
        tokens, source = 0, ""
        for i in hp.range_of(layer, ctx.handle.adapter.n_layers):
            stats = key_stats(
                ctx.handle, i, hp.stats_samples, hp.stats_tokens, ctx.stats_corpus, ctx.progress, refresh=True
            )
            tokens, source = tokens + stats.tokens, stats.source
        return {"stats_s": time.perf_counter() - started, "stats_tokens": tokens, "stats_source": source}

    # -- the edit -----------------------------------------------------------------------------

    def compute(self, ctx: EditContext, request: EditRequest, hp: MemitParams, layer: int, edit_id: str) -> Computed:
        return self.compute_batch(ctx, [request], hp, layer, edit_id)

    def compute_batch(
        self, ctx: EditContext, requests: Sequence[EditRequest], hp: MemitParams, layer: int, edit_id: str
    ) -> Computed:
        """One patch for every request; the model is left as it was."""
        handle, progress = ctx.handle, ctx.progress
        model, tok, adapter = handle.model, handle.tokenizer, handle.adapter
        layers = hp.range_of(layer, adapter.n_layers)
        top = layers[-1]
        timings: dict[str, float] = {"values": 0.0, "keys": 0.0, "solve": 0.0, "stats": 0.0}

        t = time.perf_counter()
        first = self._stats(ctx, hp, layers[0])  # computed (or read) before the values: the slow first time
        source = first.source if first else "C = I (identity fallback, no statistics)"
        for i in layers[1:]:
            self._stats(ctx, hp, i)
        timings["stats"] = time.perf_counter() - t

        prefixes = ctx.contexts(hp.n_contexts, hp.context_tokens)
        templates = [context_templates(tok, prefixes, r.prompt) for r in requests]
        units = key_units(requests)
        heads = [requests[u[0]] for u in units]  # each unit's key and residual are its first fact's
        head_templates = [templates[u[0]] for u in units]
        t = time.perf_counter()
        h = residuals(handle, top, heads)

        def tick(step: int, done: int, n: int) -> None:
            if progress:
                progress(f"optimising the values ({done}/{n} reached their targets)", step, hp.v_steps)

        targets = compute_targets(handle, requests, templates, units, top, h, hp, tick)
        timings["values"] = time.perf_counter() - t

        parts: list[LowRankPatch] = []
        kept: dict[str, torch.Tensor] = {}
        null_dims: list[int] = []
        shared: list[str] = []
        try:
            for i, at in enumerate(layers):
                t = time.perf_counter()
                keys = fact_keys(handle, at, heads, head_templates)
                now = residuals(handle, top, heads)
                timings["keys"] += time.perf_counter() - t
                t = time.perf_counter()
                stats = self._stats(ctx, hp, at)  # one layer's C in memory at a time (a 7B's is 1.4 GB)
                timings["stats"] += time.perf_counter() - t
                t = time.perf_counter()
                if i == 0 and len(heads) > 1:
                    cache = handle.caches.setdefault("rome.factor", FactorCache())
                    found = shared_keys(stats.c if stats else None, keys, cache)
                    shared = [f"{heads[a].subject} / {heads[b].subject}" for a, b, _ in found]
                share = (targets.z - now.to(targets.z.device)) / (len(layers) - i)
                v, dims, extra = self._factors(ctx, hp, at, keys, stats)
                null_dims.append(dims)
                u = share.T
                if extra is not None:
                    u, v = torch.cat([u, extra[0].to(u)], dim=1), torch.cat([v, extra[1].to(v)], dim=1)
                name = adapter.mlp_out_name(at)
                part = LowRankPatch(sidecar(model, adapter.mlp_out(at), name), edit_id, u.contiguous(), v)
                part.apply()
                parts.append(part)
                if self.keeps_keys:
                    kept[name] = keys.detach()
                timings["solve"] += time.perf_counter() - t
                if progress:
                    progress("solving the layers", i + 1, len(layers))
            after = residuals(handle, top, heads).to(targets.z.device)
        finally:
            for part in reversed(parts):
                part.revert()
        moved = (targets.z - h.to(targets.z.device)).norm(dim=1).clamp_min(1e-12)
        left = float(((targets.z - after).norm(dim=1) / moved).mean())
        info = MemitInfo(
            top,
            adapter.mlp_out_name(top),
            float(targets.nll_before.nanmean()),
            float(targets.nll_after.nanmean()),
            targets.steps,
            timings,
            layers=list(layers),
            facts=len(requests),
            stats_source=source,
            residual_left=left,
            null_dims=null_dims if self.keeps_keys else [],
            shared=shared,
        )
        return Computed(BatchPatch(parts, model, kept), info)

    # -- describing, saving, restoring --------------------------------------------------------

    def describe(self, edit: Any) -> str:
        info: MemitInfo = edit.info
        span = f"layers {info.layers[0]}-{info.layers[-1]}" if info.layers else f"layer {info.layer}"
        text = f"{span}, {info.facts} fact(s) in one solve, residual left {info.residual_left:.2f}"
        if info.shared:
            n = len(info.shared)
            text += (
                f"; {n} pair(s) of subjects share most of their key ({info.shared[0]}{', …' if n > 1 else ''}):"
                " each pair can hold only one value"
            )
        return text

    def save(self, edit: Any, put: Callable[[str, torch.Tensor], None]) -> dict[str, Any]:
        p: BatchPatch = edit.patch
        for part in p.parts:
            put(f"{edit.id}.{part.side.name}.u", part.u)
            put(f"{edit.id}.{part.side.name}.v", part.v)
        for name, k in p.keys.items():
            put(f"{edit.id}.{name}.k", k)
        return {"module": p.parts[-1].side.name, "modules": [part.side.name for part in p.parts]}

    def restore(
        self,
        model: torch.nn.Module,
        record: dict[str, Any],
        module: torch.nn.Module,
        tensors: dict[str, torch.Tensor],
        pending: dict[str, Any],
    ) -> BatchPatch:
        edit_id = record["id"]
        parts = [
            LowRankPatch(
                sidecar(model, model.get_submodule(name), name),
                edit_id,
                tensors[f"{edit_id}.{name}.u"],
                tensors[f"{edit_id}.{name}.v"],
            )
            for name in record["modules"]
        ]
        keys = {name: tensors[f"{edit_id}.{name}.k"] for name in record["modules"] if f"{edit_id}.{name}.k" in tensors}
        patch = BatchPatch(parts, model, keys)
        patch.apply()
        return patch

    def synthetic(self, handle: Any, hp: MemitParams, layer: int, i: int, g: torch.Generator) -> BatchPatch:
        parts = [
            synthetic_factors(handle, at, f"bench-{self.name}-{i}", g)
            for at in hp.range_of(layer, handle.adapter.n_layers)
        ]
        return BatchPatch(parts, handle.model, {})


class AlphaEditMethod(MemitMethod):
    name = "alphaedit"
    params = AlphaEditParams
    keeps_keys = True

    def _factors(
        self, ctx: EditContext, hp: MemitParams, layer: int, keys: torch.Tensor, stats: KeyStats | None
    ) -> tuple[torch.Tensor, int, tuple[torch.Tensor, torch.Tensor] | None]:
        if stats is None:
            raise KeditError("AlphaEdit needs key statistics for its projection; leave identity_c off")
        assert isinstance(hp, AlphaEditParams)
        space = self._space(ctx, layer, stats, hp.null_threshold)
        if space.kept == 0:
            raise KeditError(
                f"the key statistics of layer {layer} leave no null space at alphaedit.null_threshold = "
                f"{hp.null_threshold}; raise it"
            )
        name = ctx.handle.adapter.mlp_out_name(layer)
        mu = hp.l2 * float(stats.c.diagonal().mean())
        weight = hp.preserve * keys.shape[1]
        solve = AlphaEditSolve(space, keys, earlier_keys(ctx.handle.model, name), mu, weight)
        before = earlier_change(ctx.handle.model, name) if hp.pullback and weight > 0 else None
        lack = earlier_shortfall(ctx.handle.model, name) if hp.refit else None
        return solve.factors(), space.kept, solve.extra(before, lack)

    @staticmethod
    def _space(ctx: EditContext, layer: int, stats: KeyStats, threshold: float) -> NullSpace:
        """P's basis for this layer, computed once per statistics and threshold (kept with the model)."""
        cache: dict[tuple, NullSpace] = ctx.handle.caches.setdefault("alphaedit.null", {})
        key = (layer, stats.source, stats.tokens, threshold)
        if key not in cache:
            cache[key] = null_space(stats.raw(), threshold)
        return cache[key]

    def state(self, model: torch.nn.Module) -> list[str]:
        table = all_attached(model, KEYS_KIND)
        held = {name: sum(len(k) for k in t.values()) for name, t in table.items() if t}
        if not held:
            return []
        counts = sorted(set(held.values()))
        return [f"AlphaEdit: later batches keep the keys of {counts[-1]} edited fact(s) on {len(held)} layer(s)"]


MEMIT = MemitMethod()
ALPHAEDIT = AlphaEditMethod()
