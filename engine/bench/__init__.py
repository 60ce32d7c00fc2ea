"""Benchmarks: speed and memory, reported as ratios measured in one run, never asserted in tests.

``run_bench`` answers, for the loaded model:
- how long an edit takes: ROME split into its key, value optimisation and update steps,
  with the key statistics C timed on their own; GRACE and WISE; and their rollback;
- what generation costs with 1 and 3 steering vectors on every layer and with 10 and 100
  active edits of each method, as ratios of tokens/s (and of time to first token) to plain
  generation timed in the same run, the kinds interleaved so that drift on a noisy
  machine hits them all alike;
- peak memory (CUDA max allocated on a GPU, peak RSS on the CPU) while loading, editing
  and generating, and the memory the active edits add.

Every figure is the median of repeated runs after a warm-up run.

Active edits are made either for real (each method run on a list of requests, as the
user would) or, by default, as each method's own patch objects holding random contents:
the per-token work of a patch (a rank-r product, a codebook lookup, a side-memory
product and its routing) does not depend on what the edit says, and computing 100 real
WISE edits on a 7B model takes far longer than timing them.

``random_model`` and ``shape_handle`` build random-weight models of real shapes from
kedit.toml's [shapes], so all of this runs at real scale without downloading weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kedit.engine.bench.report import report_tables, report_text
from kedit.engine.bench.requests import bench_requests, request_words
from kedit.engine.bench.shapes import random_model, shape_dims, shape_handle, word_tokenizer
from kedit.engine.bench.timing import (
    Condition,
    MemoryMeter,
    Throughput,
    interleaved,
    prompt_ids,
    racked,
    random_vectors,
    steering_throughput,
)
from kedit.engine.bench.workloads import active_patches, applied, time_edits
from kedit.engine.errors import KeditError
from kedit.engine.methods.table import METHODS

Progress = Callable[[str, int, int], None]


# -- the whole bench -------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPlan:
    methods: tuple[str, ...] = tuple(m for m, k in METHODS.items() if not k.batches)  # one fact at a time
    edit_repeats: int = 3  # timed edits of each method (after one warm-up edit)
    vectors: tuple[int, ...] = (1, 3)  # steering vectors racked on every layer
    active: tuple[int, ...] = (10, 100)  # active edits of each method
    fill: str = "synthetic"  # or "real"
    new_tokens: int = 64
    prompt_tokens: int = 64
    repeats: int = 3  # timed generations of each kind (after one warm-up each)
    stats_samples: int | None = None  # ROME's C from this many texts (None: kedit.toml's)
    layer: int | None = None  # edit layer for every method (None: each method's own)


def _edit_layer_params(session: Any, method: str, plan: BenchPlan) -> dict[str, Any]:
    """Settings for the bench's edits: the plan's layer, and on a random shape, for a method that
    would trace its layer (tracing a random model finds nothing) with none configured, or one its
    --layers cut off, the method's ``bench_layer_share`` of the way up."""
    from kedit.engine.methods.table import method_named

    kind = method_named(method)
    params: dict[str, Any] = {}
    n = session.handle.adapter.n_layers
    if plan.layer is not None:
        params["layer"] = plan.layer
    elif kind.bench_layer_share is not None and session.handle.source.kind == "shape":
        configured = session.method_params(method).layer
        if configured is None or configured >= n:
            params["layer"] = round(kind.bench_layer_share * (n - 1))
    if plan.stats_samples is not None and "stats_samples" in kind.params.__dataclass_fields__:
        params["stats_samples"] = plan.stats_samples
    return params


def run_bench(session: Any, plan: BenchPlan = BenchPlan(), progress: Progress | None = None) -> dict[str, Any]:
    """Measure everything in the module docstring on the session's model; a JSON-ready report.

    The model is left as it was: every edit, patch and vector the bench makes is taken out.
    """
    unknown = [m for m in plan.methods if m not in METHODS]
    if unknown:
        raise KeditError(f"unknown method {', '.join(unknown)}; available: {', '.join(METHODS)}")
    if plan.fill not in ("synthetic", "real"):
        raise KeditError("--fill is synthetic or real")
    if session.edits:
        raise KeditError("the bench needs a model with no edits in force; /rollback them first")
    h = session.handle
    model = h.model
    device = next(model.parameters()).device
    meter = MemoryMeter(device)
    report: dict[str, Any] = {
        "model": h.describe(),
        "device": _device_name(device),
        "torch": torch.__version__,
        "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(plan).items()},
        "memory": {"kind": meter.kind, "loaded_peak_bytes": meter.peak(), "loaded_bytes": meter.now()},
        "edits": {},
        "generation": {},
    }
    n_requests = plan.edit_repeats + 1
    requests = bench_requests(session, n_requests * len(plan.methods))

    # -- edits ------------------------------------------------------------------
    for j, method in enumerate(plan.methods):
        params = _edit_layer_params(session, method, plan)
        row: dict[str, Any] = {}
        kind, hp = METHODS[method], session.method_params(method, **params)
        ctx = session.edit_context(progress=progress)
        meter.reset()
        prepared = kind.prepare(ctx, hp, kind.layer(ctx, hp))
        if prepared:
            row.update(prepared, stats_peak_bytes=meter.peak())
        meter.reset()
        row.update(time_edits(session, method, requests[j * n_requests : (j + 1) * n_requests], params, progress))
        row["peak_bytes"] = meter.peak()
        report["edits"][method] = row

    # -- generation -------------------------------------------------------------
    rack = session.steering
    conditions = [Condition("plain")]
    conditions += [racked(rack, random_vectors(h.adapter, n, seed=n)) for n in plan.vectors]
    added: dict[str, int] = {}
    for method in plan.methods if plan.active else ():
        params = _edit_layer_params(session, method, plan)
        before = meter.held()
        patches = active_patches(session, method, max(plan.active), plan.fill, params, progress)
        for n in plan.active:
            conditions.append(applied(patches[:n], f"{method} × {n}"))
        for p in patches:
            p.apply()
        added[f"{method} × {len(patches)}"] = meter.held() - before
        for p in reversed(patches):
            p.revert()
    ids = prompt_ids(model, plan.prompt_tokens)
    meter.reset()
    interleaved(model, ids, plan.new_tokens, conditions, plan.repeats, progress)
    plain = conditions[0]
    report["generation"] = {
        "prompt_tokens": plan.prompt_tokens,
        "new_tokens": plan.new_tokens,
        "plain": {"tokens_per_s": plain.tokens_per_s, "first_token_s": plain.first_token_s},
        "conditions": [
            {
                "label": c.label,
                "tokens_per_s": c.tokens_per_s,
                "first_token_s": c.first_token_s,
                "ratio": c.tokens_per_s / plain.tokens_per_s,
                "first_token_ratio": c.first_token_s / plain.first_token_s,
            }
            for c in conditions[1:]
        ],
    }
    report["memory"].update(generation_peak_bytes=meter.peak(), added_by_active_edits_bytes=added)
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


__all__ = [
    "BenchPlan",
    "Condition",
    "MemoryMeter",
    "Throughput",
    "active_patches",
    "applied",
    "bench_requests",
    "interleaved",
    "prompt_ids",
    "racked",
    "random_model",
    "random_vectors",
    "report_tables",
    "report_text",
    "request_words",
    "run_bench",
    "shape_dims",
    "shape_handle",
    "steering_throughput",
    "time_edits",
    "word_tokenizer",
]
