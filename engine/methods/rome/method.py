"""ROME end to end: key, value, statistics, rank-one update, as one Patch."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.engine.methods import EditRequest
from kedit.engine.methods.rome.hparams import RomeParams
from kedit.engine.methods.rome.key import compute_key, context_templates
from kedit.engine.methods.rome.stats import key_stats
from kedit.engine.methods.rome.update import c_inverse_k, rank_one, update_direction
from kedit.engine.methods.rome.value import compute_value
from kedit.engine.patches import LowRankPatch, sidecar

Progress = Callable[[str, int, int], None]


@dataclass
class RomeOutcome:
    """The patch (not yet applied) and what the steps measured."""

    patch: LowRankPatch
    layer: int
    info: dict[str, Any] = field(default_factory=dict)


def apply_rome(handle, request: EditRequest, hp: RomeParams, layer: int, prefixes: list[str],
               key: str, stats_corpus: Path | None = None,
               progress: Progress | None = None) -> RomeOutcome:
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

    t = time.perf_counter()
    cinv_k = c_inverse_k(c, k_star, hp.ridge)
    direction = update_direction(k_star, cinv_k)
    timings["update"] = time.perf_counter() - t

    t = time.perf_counter()

    def tick(step: int, nll: float) -> None:
        if progress:
            progress("optimising the value", step, hp.v_steps)

    value = compute_value(model, tok, module, request.prompt, request.subject, request.target,
                          contexts, v_cur, direction, hp, tick, adapter=adapter, layer=layer)
    timings["value"] = time.perf_counter() - t

    t = time.perf_counter()
    u, v = rank_one(value.delta, direction, torch.float32)
    timings["update"] += time.perf_counter() - t

    patch = LowRankPatch(sidecar(model, module, adapter.mlp_out_name(layer)), key, u, v)
    info = {"layer": layer, "module": adapter.mlp_out_name(layer), "stats_source": stats_source,
            "stats_seconds": stats_seconds, "nll_before": value.nll_before,
            "nll_after": value.nll_after, "value_steps": value.steps,
            "delta_norm": float(value.delta.norm()), "v_norm": float(v_cur.norm()), "timings": timings}
    return RomeOutcome(patch, layer, info)
