"""``kedit steer``: train, measure, merge and convert steering vectors from the command line.

Each command calls the engine's /steer actions (kedit.engine.steer_commands) directly, one step
after another, and prints what they yield as the REPL would.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from kedit.engine import events as ev
from kedit.engine.errors import KeditError
from kedit.tui.cli_common import ExitCode, json_option, model_options, open_session

Step = tuple[str, Callable[[], Iterator[ev.Event]]]


def run_steps(session: Any, steps: list[Step], as_json: bool = False) -> None:
    """Run (label, action) steps in order, printing their events as the REPL would (or, with
    ``as_json``, one JSON array of them at the end, each tagged with its step's label); the
    first error ends the run with exit code 1."""
    import dataclasses

    from kedit.tui.repl import render

    seen: list[dict] = []
    for label, action in steps:
        failed: list[ev.Error] = []

        def watch(action: Callable[[], Iterator[ev.Event]], label: str = label, failed: list[ev.Error] = failed):
            try:
                for event in action():
                    if as_json and not isinstance(event, (ev.Token, ev.Progress)):
                        seen.append(
                            {"type": type(event).__name__.lower(), "command": label, **dataclasses.asdict(event)}
                        )
                    else:
                        yield event
            except KeditError as exc:
                failed.append(ev.Error(exc.message))
                yield failed[-1]

        render(watch(action), session, sys.stdout, sys.stderr)
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
    from kedit.engine import steer_commands as steer
    from kedit.engine.steering import parse_layers, parse_read, read_pairs

    session = open_session(model, quant, dtype, device)
    name = "trained"
    steps: list[Step] = [
        (
            "train",
            lambda: steer.train(
                session,
                read_pairs(Path(pairs)),
                name,
                method=method,
                layers=parse_layers(layers),
                read=parse_read(read),
            ),
        )
    ]
    if strength is not None:
        steps.append(("set", lambda: steer.set_strength(session, name, strength)))
    run_steps(session, steps + [("save", lambda: steer.save(session, name, Path(out)))], as_json=as_json)


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
    from kedit.engine import steer_commands as steer
    from kedit.engine.steering import read_pairs
    from kedit.engine.vector_io import vector_name

    session = open_session(model, quant, dtype, device)
    name = vector_name(vector)
    run_steps(
        session,
        [
            ("add", lambda: steer.add(session, Path(vector), 0.0)),
            (
                "sweep",
                lambda: steer.sweep_strength(
                    session, name, read_pairs(Path(pairs)), strengths=strengths, neutral=neutral
                ),
            ),
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
    from kedit.engine import steer_commands as steer
    from kedit.engine.vector_io import vector_name

    session = open_session(model, quant, dtype, device)
    name = vector_name(source)
    run_steps(
        session,
        [("add", lambda: steer.add(session, Path(source))), ("save", lambda: steer.save(session, name, Path(out)))],
        as_json=as_json,
    )


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
    from kedit.engine import steer_commands as steer
    from kedit.engine.steering import parse_floats
    from kedit.engine.vector_io import vector_name

    session = open_session(model, quant, dtype, device)
    names = [vector_name(v) for v in vectors]
    steps: list[Step] = [("add", lambda v=v: steer.add(session, Path(v))) for v in vectors]
    steps += [
        (
            "merge",
            lambda: steer.merge(
                session,
                names,
                "merged",
                weights=parse_floats(weights, "merge weights") if weights else None,
                mode=mode,
            ),
        ),
        ("save", lambda: steer.save(session, "merged", Path(out))),
    ]
    run_steps(session, steps, as_json=as_json)
