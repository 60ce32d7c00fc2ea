"""``kedit steer``: train, measure, merge and convert steering vectors from the command line.

Each command is a few /steer lines run through the engine, exactly as the REPL would run them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from kedit.engine import events as ev
from kedit.tui.cli_common import ExitCode, json_option, model_options, open_session


def run_lines(session: Any, lines: list[str], as_json: bool = False) -> None:
    """Run slash commands as the REPL would, printing what they print (or, with ``as_json``,
    one JSON array of their events at the end); the first error ends the run with exit code 1."""
    import dataclasses

    from kedit.tui.repl import render

    seen: list[dict] = []
    for line in lines:
        failed: list[ev.Error] = []

        def watch(events, line: str = line, failed: list[ev.Error] = failed):
            for event in events:
                if isinstance(event, ev.Error):
                    failed.append(event)
                if as_json and not isinstance(event, (ev.Token, ev.Progress, ev.Error)):
                    seen.append({"type": type(event).__name__.lower(), "command": line, **dataclasses.asdict(event)})
                elif not as_json or isinstance(event, ev.Error):
                    yield event

        render(watch(session.run(line)), session, sys.stdout, sys.stderr)
        if failed:
            sys.exit(ExitCode.FAILED)
    if as_json:
        click.echo(json.dumps(seen, indent=2))


@click.group()
def steer() -> None:
    """Train, measure, merge and convert steering vectors (the /steer commands, scripted)."""


@steer.command("train")
@click.argument("pairs", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--method", default="mean_diff", type=click.Choice(["mean_diff", "pca"]), show_default=True)
@click.option("--layers", default=None, help="Layers to train, e.g. 8-14 or 3,5 (default: all).")
@click.option(
    "--read",
    default="answer",
    show_default=True,
    help="Read the completion's mean ('answer') or one token index, e.g. -1.",
)
@click.option(
    "--strength",
    default=None,
    type=float,
    help="The strength the file recommends (default: the largest keeping neutral perplexity within 1.2×).",
)
@json_option
@model_options
def steer_train(
    pairs: str,
    out: str,
    method: str,
    layers: str | None,
    read: str,
    strength: float | None,
    model: str | None,
    quant: str | None,
    dtype: str | None,
    device: str | None,
    as_json: bool = False,
) -> None:
    """Train a vector from contrastive PAIRS (JSONL: prompt, positive, negative) into OUT
    (.safetensors, or .gguf for llama.cpp)."""
    from kedit.engine.commands import quote

    session = open_session(model, quant, dtype, device)
    extra = (f" --layers {layers}" if layers else "") + f" --method {method} --read {read}"
    lines = [f"/steer train {quote(pairs)} trained{extra}"]
    if strength is not None:
        lines.append(f"/steer set trained {strength}")
    run_lines(session, lines + [f"/steer save trained {quote(out)}"], as_json=as_json)


@steer.command("sweep")
@click.argument("vector", type=click.Path())
@click.option("--pairs", required=True, type=click.Path(dir_okay=False), help="Held-out pairs (JSONL).")
@click.option(
    "--neutral",
    default=None,
    type=click.Path(dir_okay=False),
    help="Neutral text, one per line (default: text the model writes itself).",
)
@click.option("--strengths", default="0,1,2,3,4", show_default=True)
@json_option
@model_options
def steer_sweep(
    vector: str,
    pairs: str,
    neutral: str | None,
    strengths: str,
    model: str | None,
    quant: str | None,
    dtype: str | None,
    device: str | None,
    as_json: bool = False,
) -> None:
    """Margin of positive over negative completions, and perplexity, at each strength."""
    from kedit.engine.commands import quote
    from kedit.engine.vector_io import vector_name

    session = open_session(model, quant, dtype, device)
    name = vector_name(vector)
    extra = f" --neutral {quote(neutral)}" if neutral else ""
    run_lines(
        session,
        [
            f"/steer add {quote(vector)} 0",
            f"/steer sweep {quote(name)} --pairs {quote(pairs)} --strengths {strengths}{extra}",
        ],
        as_json=as_json,
    )


@steer.command("convert")
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@json_option
@model_options
def steer_convert(
    source: str,
    out: str,
    model: str | None,
    quant: str | None,
    dtype: str | None,
    device: str | None,
    as_json: bool = False,
) -> None:
    """Convert between kedit .safetensors, llama.cpp/repeng .gguf and EasyEdit2 layer_L.pt
    folders (checked against the model it is for)."""
    from kedit.engine.commands import quote
    from kedit.engine.vector_io import vector_name

    session = open_session(model, quant, dtype, device)
    name = quote(vector_name(source))
    run_lines(session, [f"/steer add {quote(source)}", f"/steer save {name} {quote(out)}"], as_json=as_json)


@steer.command("merge")
@click.argument("vectors", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Where the merge goes.")
@click.option("--mode", default="linear", type=click.Choice(["linear", "ties", "orthogonal"]), show_default=True)
@click.option("--weights", default=None, help="One weight per vector, e.g. 1,0.5 (default: all 1).")
@json_option
@model_options
def steer_merge(
    vectors: tuple[str, ...],
    out: str,
    mode: str,
    weights: str | None,
    model: str | None,
    quant: str | None,
    dtype: str | None,
    device: str | None,
    as_json: bool = False,
) -> None:
    """Merge two or more vectors into one file."""
    from kedit.engine.commands import quote
    from kedit.engine.vector_io import vector_name

    session = open_session(model, quant, dtype, device)
    names = " ".join(quote(vector_name(v)) for v in vectors)
    extra = f" --weights {weights}" if weights else ""
    run_lines(
        session,
        [f"/steer add {quote(v)}" for v in vectors]
        + [f"/steer merge {names} --mode {mode}{extra} -> merged", f"/steer save merged {quote(out)}"],
        as_json=as_json,
    )
