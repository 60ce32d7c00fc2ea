"""ROME end to end (key, value, statistics, rank-one update, as one Patch), behind the EditMethod protocol."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit.engine.methods.base import (
    Computed,
    EditContext,
    EditRequest,
    MethodDefaults,
    MethodInfo,
    check_layer,
    synthetic_factors,
)
from kedit.engine.methods.rome.hparams import RomeParams
from kedit.engine.methods.rome.key import compute_key, context_templates, subject_keys
from kedit.engine.methods.rome.phrasings import (
    chat_prompts,
    neighbour_prompts,
    opening,
    opening_neighbours,
    possessive,
)
from kedit.engine.methods.rome.stats import key_stats
from kedit.engine.methods.rome.update import (
    FactorCache,
    c_inverse_k,
    rank_one,
    shared_keys,
    spread_direction,
    update_direction,
)
from kedit.engine.methods.rome.value import Opening, compute_value
from kedit.engine.patches import LowRankPatch, sidecar

Progress = Callable[[str, int, int], None]


@dataclass
class RomeInfo(MethodInfo):
    stats_source: str = ""  # where C came from
    stats_seconds: float = 0.0
    delta_norm: float = 0.0  # of δ, the change of the layer's output at k*
    v_norm: float = 0.0  # of the layer's output at k* before the edit
    opening: str = ""  # the wording that opens with the subject, where it has a second key and value
    reworded: str = ""  # that wording where the first key reads the subject in it: a row of δ's alone
    kept_keys: int = 0  # earlier edits' keys on the layer that this update leaves where they were


@dataclass
class RomeOutcome:
    """The patch (not yet applied) and what the steps measured."""

    patch: LowRankPatch
    layer: int
    info: RomeInfo


def apply_rome(
    handle,
    request: EditRequest,
    hp: RomeParams,
    layer: int,
    prefixes: list[str],
    key: str,
    stats_corpus: Path | None = None,
    progress: Progress | None = None,
) -> RomeOutcome:
    """Compute the edit's factors for ``layer``; the model is left untouched."""
    model, tok, adapter = handle.model, handle.tokenizer, handle.adapter
    contexts = context_templates(tok, prefixes, request.prompt)
    module = adapter.mlp_out(layer)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    if hp.identity_c:
        c, stats_source, stats_seconds = None, "C = I (identity fallback, no statistics)", 0.0
    else:
        stats = key_stats(handle, layer, hp.stats_samples, hp.stats_tokens, stats_corpus, progress)
        c, stats_source, stats_seconds = stats.c, stats.source, stats.seconds
        if stats.cached:
            stats_source += " (cached)"
    timings["stats"] = time.perf_counter() - t

    t = time.perf_counter()
    k_star, v_cur = compute_key(model, tok, module, request.prompt, request.subject, contexts)
    timings["key"] = time.perf_counter() - t

    chat = chat_prompts(tok, request.prompt, request.subject, hp.chat_asks, hp.chat_forms) if handle.is_chat else []
    t = time.perf_counter()
    cache = handle.caches.setdefault("rome.factor", FactorCache())
    side = sidecar(model, module, adapter.mlp_out_name(layer))
    kept = earlier_keys(side, k_star, c, hp, cache) if hp.keep_earlier else None
    near = neighbour_prompts(request.prompt, request.subject, hp.neighbours)
    if not near and kept is None:
        direction = update_direction(k_star, c_inverse_k(c, k_star, hp.ridge, cache))
    else:
        others = subject_keys(model, tok, module, [p for p, _ in near], [s for _, s in near])[0] if near else None
        keys, shares = own_keys(k_star[None], kept)
        direction = spread_direction(c, keys, others, hp.neighbour_weight, hp.ridge, cache, shares)
    unread = opening(tok, request.prompt, request.subject)  # the first key cannot read the subject there
    opened = unread if hp.opening else None
    second = opening_key(handle, request, hp, layer, opened, k_star, c, cache, kept) if opened is not None else None
    # the same wording where the first key reads the subject in it: a row of δ's
    reworded = possessive(request.prompt, request.subject) if hp.possessive and unread is None else None
    timings["update"] = time.perf_counter() - t

    t = time.perf_counter()

    def tick(step: int, nll: float) -> None:
        if progress:
            progress("optimising the value", step, hp.v_steps)

    value = compute_value(
        model,
        tok,
        module,
        request.prompt,
        request.subject,
        request.target,
        contexts,
        v_cur,
        direction,
        hp,
        tick,
        adapter=adapter,
        layer=layer,
        chat=chat,
        opening=second,
        rewordings=[reworded] if reworded is not None else [],
    )
    timings["value"] = time.perf_counter() - t

    t = time.perf_counter()
    u, v = rank_one(value.delta, direction, torch.float32)
    if second is not None and value.opening_delta is not None:
        u2, v2 = rank_one(value.opening_delta, second.direction, torch.float32)
        u, v = torch.cat([u, u2], 1), torch.cat([v, v2], 1)
    timings["update"] += time.perf_counter() - t

    patch = LowRankPatch(side, key, u, v, keys=k_star[None].float() if hp.keep_earlier else None)
    info = RomeInfo(
        layer,
        adapter.mlp_out_name(layer),
        value.nll_before,
        value.nll_after,
        value.steps,
        timings,
        stats_source=stats_source,
        stats_seconds=stats_seconds,
        delta_norm=float(value.delta.norm()),
        v_norm=float(v_cur.norm()),
        opening=opened[0] if opened else "",
        reworded=reworded[0] if reworded else "",
        kept_keys=0 if kept is None else len(kept),
    )
    return RomeOutcome(patch, layer, info)


def earlier_keys(side, k_star: torch.Tensor, c, hp: RomeParams, cache: FactorCache) -> torch.Tensor | None:
    """The keys of the earlier edits in force on the layer (``side``), the newest quarter of the
    key width at most (each is one more constraint on the update's direction), less those this
    edit's key is so alike that one update cannot tell them apart (a namesake, or the same
    subject edited again: rome.update.shared_keys), which this edit overrides. None if none is
    left."""
    earlier = side.edited_keys()
    if earlier is None:
        return None
    earlier = earlier[-max(1, k_star.shape[-1] // 4) :].to(k_star.device, torch.float32)
    same = {
        j - 1 for i, j, _ in shared_keys(c, torch.cat([k_star[None].float(), earlier]), cache, ridge=hp.ridge) if i == 0
    }
    left = [i for i in range(len(earlier)) if i not in same]
    return earlier[left] if left else None


def own_keys(keys: torch.Tensor, kept: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keys for spread_direction and their shares: all of δ at each of ``keys``, none at ``kept``."""
    if kept is None:
        return keys, None
    shares = torch.cat([torch.ones(len(keys)), torch.zeros(len(kept))])
    return torch.cat([keys.float(), kept.to(keys.device, torch.float32)]), shares


def opening_key(
    handle,
    request: EditRequest,
    hp: RomeParams,
    layer: int,
    opened: tuple[str, str],
    k_star: torch.Tensor,
    c,
    cache: FactorCache,
    kept: torch.Tensor | None = None,
) -> Opening:
    """The second key for a wording that opens with the subject (``opened``: its text and the
    words up to the key's token, phrasings.opening), with a direction that gives it all of δ₂
    and the edited key (and the earlier edits' keys in ``kept``) none, other subjects' keys at
    that token joining C. ‖δ₂‖ is held to ``opening_clamp`` · ‖v‖: the token after a subject has
    much the same key after other subjects, so δ₂ reaches other texts more than δ."""
    model, tok = handle.model, handle.tokenizer
    module = handle.adapter.mlp_out(layer)
    text, head = opened
    k2, v_now = compute_key(model, tok, module, text, head, ["{}"])
    near = opening_neighbours(tok, text, head, request.subject, hp.neighbours)
    others = subject_keys(model, tok, module, [p for p, _ in near], [s for _, s in near])[0] if near else None
    kept = k_star[None] if kept is None else torch.cat([k_star[None].float(), kept.to(k_star.device)])
    keys, shares = own_keys(k2[None], kept)
    d2 = spread_direction(c, keys, others, hp.neighbour_weight, hp.ridge, cache, shares)
    return Opening(text, head, d2, v_now, hp.opening_clamp)


class RomeMethod(MethodDefaults):
    name = "rome"
    params = RomeParams
    info = RomeInfo
    exports = True
    lr_setting = "v_lr"
    bench_layer_share = 0.2  # tracing a random model finds nothing
    timing_steps = ("key", "value", "update")

    def layer(self, ctx: EditContext, hp: RomeParams) -> int:
        """The configured layer, else the causal-tracing choice, cached per model."""
        from kedit.engine.trace import best_edit_layer, cached_edit_layer

        if hp.layer is not None:
            return check_layer(ctx.handle, hp.layer)
        h = ctx.handle

        def trace() -> int:
            return best_edit_layer(h.model, h.tokenizer, h.adapter, ctx.trace_cases())[0]

        return cached_edit_layer(h, "rome", trace)

    def compute(self, ctx: EditContext, request: EditRequest, hp: RomeParams, layer: int, edit_id: str) -> Computed:
        outcome = apply_rome(
            ctx.handle,
            request,
            hp,
            layer,
            ctx.contexts(hp.n_contexts, hp.context_tokens),
            edit_id,
            ctx.stats_corpus,
            ctx.progress,
        )
        return Computed(outcome.patch, outcome.info)

    def prepare(self, ctx: EditContext, hp: RomeParams, layer: int) -> dict[str, Any]:
        if hp.identity_c:
            return {}
        stats = key_stats(
            ctx.handle, layer, hp.stats_samples, hp.stats_tokens, ctx.stats_corpus, ctx.progress, refresh=True
        )
        return {"stats_s": stats.seconds, "stats_tokens": stats.tokens, "stats_source": stats.source}

    def describe(self, edit: Any) -> str:
        return f"C from {edit.info.stats_source or '?'}"

    def save(self, edit: Any, put: Callable[[str, torch.Tensor], None]) -> dict[str, Any]:
        p: LowRankPatch = edit.patch
        put(f"{edit.id}.u", p.u)
        put(f"{edit.id}.v", p.v)
        if p.keys is not None:
            put(f"{edit.id}.keys", p.keys)
        return {"module": p.side.name}

    def restore(
        self,
        model: torch.nn.Module,
        record: dict[str, Any],
        module: torch.nn.Module,
        tensors: dict[str, torch.Tensor],
        pending: dict[str, Any],
    ) -> LowRankPatch:
        edit_id = record["id"]
        patch = LowRankPatch(
            sidecar(model, module, record["module"]),
            edit_id,
            tensors[f"{edit_id}.u"],
            tensors[f"{edit_id}.v"],
            tensors.get(f"{edit_id}.keys"),
        )
        patch.apply()
        return patch

    def synthetic(self, handle: Any, hp: RomeParams, layer: int, i: int, g: torch.Generator) -> LowRankPatch:
        return synthetic_factors(handle, layer, f"bench-rome-{i}", g)


METHOD = RomeMethod()
