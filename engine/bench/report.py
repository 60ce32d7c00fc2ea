"""A bench report as tables and text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kedit.engine import events as ev
from kedit.engine.methods.table import METHODS

Progress = Callable[[str, int, int], None]


# -- reading a report ------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:,.0f} MiB"


def report_tables(report: dict[str, Any]) -> list[ev.Table]:
    """The report as tables a terminal can show (events.table_text renders them)."""
    tables = []
    edits = report["edits"]
    rows: list[tuple[str, ...]]
    if edits:
        rows = []
        for method, r in edits.items():
            shown = METHODS[method].timing_steps if method in METHODS else ()
            split = (
                " · ".join(
                    f"{k} {_ms(r.get(k))}" + (f" ({r.get('steps', 0):.0f} steps)" if k == "value" else "")
                    for k in shown
                )
                or f"{r.get('steps', 0):.0f} steps"
            )
            rows.append(
                (
                    method,
                    _ms(r.get("edit")),
                    _ms(r.get("compute")),
                    _ms((r.get("probe") or 0) + (r.get("locality") or 0)),
                    split,
                    _ms(r.get("rollback")),
                    _mib(r.get("peak_bytes")),
                )
            )
        tables.append(
            ev.Table(
                f"Edits (median of {report['plan']['edit_repeats']}, after a warm-up)",
                ("method", "edit", "compute", "probe (before+after)", "steps", "rollback", "peak memory"),
                tuple(rows),
            )
        )
        for method, r in edits.items():
            if "stats_s" in r:
                tables.append(
                    ev.Table(
                        f"{method.upper()} key statistics C (once per model and layer, then cached)",
                        ("time", "tokens", "source", "peak memory"),
                        (
                            (
                                _ms(r["stats_s"]),
                                f"{r['stats_tokens']:,}",
                                r["stats_source"],
                                _mib(r.get("stats_peak_bytes")),
                            ),
                        ),
                    )
                )
    gen = report["generation"]
    rows = [("plain", f"{gen['plain']['tokens_per_s']:.1f}", "1.000", _ms(gen["plain"]["first_token_s"]), "1.000")]
    rows += [
        (
            c["label"],
            f"{c['tokens_per_s']:.1f}",
            f"{c['ratio']:.3f}",
            _ms(c["first_token_s"]),
            f"{c['first_token_ratio']:.3f}",
        )
        for c in gen["conditions"]
    ]
    fill = report["plan"]["fill"]
    tables.append(
        ev.Table(
            f"Generation: {gen['prompt_tokens']}-token prompt, {gen['new_tokens']} new tokens, "
            f"median of {report['plan']['repeats']} (active edits: {fill})",
            ("state", "tokens/s", "ratio", "first token", "ratio"),
            tuple(rows),
        )
    )
    mem = report["memory"]
    rows = [
        ("after loading (peak)", _mib(mem["loaded_peak_bytes"])),
        ("generating (peak)", _mib(mem.get("generation_peak_bytes"))),
    ]
    held = "allocated" if mem["kind"].startswith("CUDA") else "in tensors"
    rows += [
        (f"held by {label} active edits ({held})", _mib(n))
        for label, n in mem.get("added_by_active_edits_bytes", {}).items()
    ]
    tables.append(ev.Table(f"Memory ({mem['kind']})", ("", "bytes"), tuple(rows)))
    return tables


def report_text(report: dict[str, Any]) -> str:
    head = f"{report['model']}\n{report['device']}, torch {report['torch']}"
    return "\n\n".join([head] + [ev.table_text(t) for t in report_tables(report)])
