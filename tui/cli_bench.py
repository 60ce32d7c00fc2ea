"""``kedit bench``: speed and memory of editing, steering and the TUI (benchmarks, not tests)."""

from __future__ import annotations

import json

import click

from kedit.engine.errors import KeditError
from kedit.engine.methods.table import METHODS
from kedit.tui.cli_common import model_options, open_session, progress_on_stderr, quiet_libraries


def int_list(text: str, what: str) -> tuple[int, ...]:
    """'10,100' as (10, 100); an empty text is ()."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{what} takes whole numbers separated by commas, e.g. 10,100") from None
    if any(v < 0 for v in values):
        raise click.BadParameter(f"{what} takes numbers of zero or more")
    return values


@click.group(invoke_without_command=True)
@click.option(
    "--shape",
    default=None,
    help="A random-weight model of this kedit.toml [shapes] entry (qwen2.5-7b, llama-3-8b, mistral-7b, "
    "bench-small) instead of --model.",
)
@click.option("--layers", "n_layers", default=None, type=int, help="With --shape: keep only this many layers.")
@click.option(
    "--methods",
    default=",".join(m for m, k in METHODS.items() if not k.batches),
    show_default=True,
    help="Edit methods to time.",
)
@click.option("--edit-repeats", default=3, show_default=True, help="Timed edits of each method (median).")
@click.option("--vectors", default="1,3", show_default=True, help="Steering vectors racked on every layer.")
@click.option("--active", default="10,100", show_default=True, help="Active edits of each method while generating.")
@click.option(
    "--fill",
    default="synthetic",
    show_default=True,
    type=click.Choice(["synthetic", "real"]),
    help="Active edits: each method's patches with random contents, or real edits.",
)
@click.option("--tokens", default=64, show_default=True, help="New tokens per timed generation.")
@click.option("--prompt-tokens", default=64, show_default=True, help="Prompt length for generation.")
@click.option("--repeats", default=3, show_default=True, help="Timed generations of each kind (median).")
@click.option("--stats-samples", default=None, type=int, help="ROME's key statistics from this many texts.")
@click.option("--layer", default=None, type=int, help="Edit this layer with every method.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for CI artefacts).")
@model_options
@click.pass_context
def bench(
    ctx: click.Context,
    shape: str | None,
    n_layers: int | None,
    methods: str,
    edit_repeats: int,
    vectors: str,
    active: str,
    fill: str,
    tokens: int,
    prompt_tokens: int,
    repeats: int,
    stats_samples: int | None,
    layer: int | None,
    as_json: bool,
    model: str | None,
    quant: str | None,
    dtype: str | None,
    device: str | None,
) -> None:
    """Speed and memory, as ratios measured in one run (benchmarks, not tests).

    Without a subcommand: edit time per method (ROME split into key, value and update,
    its key statistics apart), rollback time, tokens/s and time to first token with
    steering vectors and with active edits against plain generation, and peak memory.
    """
    if ctx.invoked_subcommand is not None:
        return
    from kedit.engine.bench import BenchPlan, report_text, run_bench, shape_handle
    from kedit.engine.config import Config
    from kedit.engine.session import Session

    if shape and model:
        raise click.UsageError("give --model or --shape, not both")
    if n_layers is not None and (not shape or n_layers < 1):
        raise click.BadParameter("--layers takes 1 or more, and goes with --shape")
    if min(edit_repeats, tokens, prompt_tokens, repeats) < 1 or tokens < 2:
        raise click.BadParameter("--edit-repeats, --prompt-tokens and --repeats take 1 or more, --tokens 2 or more")
    plan = BenchPlan(
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        edit_repeats=edit_repeats,
        vectors=tuple(v for v in int_list(vectors, "--vectors") if v),
        active=tuple(a for a in int_list(active, "--active") if a),
        fill=fill,
        new_tokens=tokens,
        prompt_tokens=prompt_tokens,
        repeats=repeats,
        stats_samples=stats_samples,
        layer=layer,
    )
    if shape:
        quiet_libraries()
        try:
            config = Config.load()
            session = Session(
                shape_handle(
                    config,
                    shape,
                    n_layers=n_layers,
                    dtype=dtype,
                    device=device,
                    quant=quant,
                    progress=progress_on_stderr,
                ),
                config,
            )
        except KeditError as exc:
            raise click.ClickException(exc.message) from None
    else:
        session = open_session(model, quant, dtype, device)
    import torch

    try:
        report = run_bench(session, plan, progress_on_stderr)
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
    except torch.cuda.OutOfMemoryError:
        raise click.ClickException(
            "the GPU ran out of memory during the bench; try --quant 4bit, fewer "
            "--active edits, or --layers with --shape"
        ) from None
    click.echo(json.dumps(report, indent=2) if as_json else report_text(report))


@bench.command("steering")
@click.option(
    "--random",
    "shapes",
    multiple=True,
    help="Also a random-weight model of this kedit.toml [shapes] entry, e.g. bench-small or qwen2.5-7b.",
)
@click.option("--random-layers", default=None, type=int, help="Override the random model's layer count.")
@click.option("--vectors", "n_vectors", default=3, show_default=True, help="Vectors racked on every layer.")
@click.option("--tokens", default=64, show_default=True, help="Tokens generated per run.")
@click.option("--repeats", default=3, show_default=True, help="Timed runs of each kind (the median counts).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@model_options
def bench_steering(
    shapes: tuple[str, ...],
    random_layers: int | None,
    n_vectors: int,
    tokens: int,
    repeats: int,
    as_json: bool,
    model: str | None,
    quant: str | None,
    dtype: str | None,
    device: str | None,
) -> None:
    """Tokens/s unsteered vs N vectors on every layer: the loaded model, then random-weight ones."""
    from kedit.engine.bench import random_model, shape_dims, steering_throughput
    from kedit.engine.config import Config

    try:
        dims = {shape: shape_dims(Config.load(), shape) for shape in shapes}
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
    session = open_session(model, quant, dtype, device)
    results = [steering_throughput(session.model, session.handle.name, n_vectors, tokens, repeats=repeats)]
    for shape in shapes:
        m = random_model(
            dims[shape],
            random_layers,
            dtype="float32" if session.handle.device == "cpu" else "bfloat16",
            device=session.handle.device,
        )
        results.append(steering_throughput(m, f"random {shape}", n_vectors, tokens, repeats=repeats))
        del m
    if as_json:
        click.echo(json.dumps([{**vars(r), "ratio": r.ratio} for r in results], indent=2))
        return
    click.echo(f"greedy generation, {tokens} tokens, median of {repeats}; {n_vectors} vectors on every layer")
    for r in results:
        click.echo(
            f"  {r.label:<28} {r.layers:>3} layers  plain {r.plain_tps:8.1f} tok/s  steered "
            f"{r.steered_tps:8.1f} tok/s  ratio {r.ratio:.3f}"
        )


@bench.command("tui")
@click.option("--tokens", default=200, show_default=True, help="Length of the streamed reply.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@model_options
def bench_tui(
    tokens: int, as_json: bool, model: str | None, quant: str | None, dtype: str | None, device: str | None
) -> None:
    """How the Textual app keeps up while a reply streams: UI loop lag and keystroke echo, idle vs generating."""
    import asyncio

    from kedit.tui.bench_ui import measure

    session = open_session(model, quant, dtype, device)
    session.config = session.config.with_overrides(
        {"generation.max_new_tokens": tokens, "generation.min_new_tokens": tokens}
    )
    idle, busy, run = asyncio.run(measure(session, "Where did Watts Humphrey study?"))
    figures = {"idle": idle.summary(), "generating": busy.summary(), **run}
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    click.echo(f"{run['tokens']} tokens streamed in {run['seconds']:.2f} s ({run['tokens_per_s']:.0f} tok/s)")
    for label, r in (("idle", idle), ("generating", busy)):
        f = r.summary()
        click.echo(
            f"  {label:<11} loop lag median {f['lag_median_ms']:6.2f} ms  p95 {f['lag_p95_ms']:6.2f}  "
            f"max {f['lag_max_ms']:6.2f} · keystroke echo median {f['echo_median_ms']:6.2f} ms  "
            f"p95 {f['echo_p95_ms']:6.2f}  max {f['echo_max_ms']:6.2f}  ({int(f['samples'])} keys)"
        )
