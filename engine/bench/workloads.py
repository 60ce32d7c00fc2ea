"""What the bench puts on the model: active edits of each method and timed edits, steering vectors."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kedit.engine.bench.requests import bench_requests
from kedit.engine.bench.timing import Condition

Progress = Callable[[str, int, int], None]


# -- active edits ----------------------------------------------------------------------------


def active_patches(
    session: Any, method: str, n: int, fill: str, params: dict[str, Any], progress: Progress | None = None
) -> list[Any]:
    """n patches of ``method``, made in order on the model and then all reverted (kept for reuse).

    ``fill`` "real" computes real edits through Session.edit; "synthetic" builds each
    method's patch objects with random contents (see the module docstring).
    """
    from kedit.engine.methods.table import method_named

    kind = method_named(method)
    patches: list[Any] = []
    if fill == "real":
        try:
            for i, (prompt, subject, target) in enumerate(bench_requests(session, n)):
                patches.append(session.edit(prompt, target, subject=subject, method=method, params=params).patch)
                if progress:
                    progress(f"{method}: {n} real edits", i + 1, n)
        finally:
            for edit in reversed(session.edits[-len(patches) :] if patches else []):
                session.rollback(edit.id)
        return patches
    hp = session.method_params(method, **params)
    layer = kind.layer(session.edit_context(), hp)
    g = torch.Generator().manual_seed(0)
    try:
        for i in range(n):
            patch = kind.synthetic(session.handle, hp, layer, i, g)
            patch.apply()  # WISE places each edit by the ones before it
            patches.append(patch)
    finally:
        for patch in reversed(patches):
            patch.revert()
    return patches


def applied(patches: Sequence[Any], label: str) -> Condition:
    def enter() -> None:
        for p in patches:
            p.apply()

    def leave() -> None:
        for p in reversed(patches):
            p.revert()

    return Condition(label, enter, leave)


# -- edit timing -----------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def time_edits(
    session: Any,
    method: str,
    requests: Sequence[tuple[str, str, str]],
    params: dict[str, Any],
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Edit with each request after a warm-up one, rolling each back: median seconds per step."""
    steps: dict[str, list[float]] = {}
    for i, (prompt, subject, target) in enumerate(requests):
        edit = session.edit(prompt, target, subject=subject, method=method, params=params)
        started = time.perf_counter()
        session.rollback(edit.id)
        rollback = time.perf_counter() - started
        if progress:
            progress(f"timing {method} edits", i + 1, len(requests))
        if i == 0:
            continue  # warm-up
        for name, seconds in {**edit.info.timings, "edit": edit.seconds, "rollback": rollback}.items():
            steps.setdefault(name, []).append(seconds)
        steps.setdefault("steps", []).append(float(edit.info.value_steps))
    return {name: _median(values) for name, values in steps.items()}
