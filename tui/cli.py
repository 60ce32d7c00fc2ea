"""The ``kedit`` command line (click): thin commands over the engine.

Data goes to stdout, diagnostics to stderr. A mistake a user made exits 1 with a
message and no traceback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from enum import IntEnum
from pathlib import Path
from typing import Any

import click

from kedit.engine import events as ev
from kedit.engine.errors import KeditError


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # the user's request could not be done (bad model name, failed expectation)
    USAGE = 2  # malformed input


def _quiet_libraries() -> None:
    """Keep library chatter off a user's terminal; their progress bars only on a TTY."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


def model_options(fn: Any) -> Any:
    """The options every model-loading command shares."""
    fn = click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps.")(fn)
    fn = click.option("--dtype", default=None,
                      type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                      help="Weight dtype (auto: float32 on CPU, the checkpoint's on GPU).")(fn)
    fn = click.option("--quant", default=None, type=click.Choice(["4bit", "8bit"]),
                      envvar="KEDIT_QUANT", help="Load with bitsandbytes 4-bit or 8-bit weights.")(fn)
    fn = click.option("-m", "--model", default=None, envvar="KEDIT_MODEL",
                      help="Alias, hub id or local folder (default: the embedded fact-world model).")(fn)
    return fn


def progress_on_stderr(label: str, done: int, total: int) -> None:
    """A one-line counter for long steps, on a terminal only (stdout keeps the data)."""
    if sys.stderr.isatty():
        click.echo(f"\r\033[K{label}: {done}/{total}", err=True, nl=False)
        if done >= total:
            click.echo("\r\033[K", err=True, nl=False)


def int_list(text: str, what: str) -> tuple[int, ...]:
    """'10,100' as (10, 100); an empty text is ()."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{what} takes whole numbers separated by commas, e.g. 10,100") from None
    if any(v < 0 for v in values):
        raise click.BadParameter(f"{what} takes numbers of zero or more")
    return values


def open_session(model: str | None, quant: str | None, dtype: str | None, device: str | None):
    from kedit.engine.session import Session

    _quiet_libraries()
    try:
        return Session.open(model, quant=quant, dtype=dtype, device=device,
                            show_progress=sys.stderr.isatty())
    except KeditError as exc:
        raise click.ClickException(exc.message) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kedit")
def main() -> None:
    """kedit: edit a language model while you talk to it."""


@main.command()
@model_options
def chat(model: str | None, quant: str | None, dtype: str | None, device: str | None) -> None:
    """Chat with a model in a REPL; slash commands edit and inspect it.

    With stdin not a terminal, each input line is one turn:
    printf 'Watts Humphrey attended\\n/quit\\n' | kedit chat
    """
    from kedit.tui import repl

    session = open_session(model, quant, dtype, device)
    sys.exit(repl.main(session))


@main.command()
@model_options
def tui(model: str | None, quant: str | None, dtype: str | None, device: str | None) -> None:
    """The Textual workbench: chat, and panels for edits, steering and probes.

    The model loads in the background; the app is usable at once.
    """
    from kedit.engine.session import Session
    from kedit.tui import app

    _quiet_libraries()
    sys.exit(app.main(lambda: Session.open(model, quant=quant, dtype=dtype, device=device, show_progress=False)))


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report instead.")
@model_options
def replay(files: tuple[Path, ...], as_json: bool, model: str | None, quant: str | None, dtype: str | None,
           device: str | None) -> None:
    """Replay recipes (TOML files of commands and expectations).

    Exit code 0: every expectation held; 1: one failed; 2: a recipe is malformed
    (the message names the file and the line). --model replaces each recipe's model.
    """
    from kedit.engine.recipes import RecipeError, load_recipe, replay as replay_recipe
    from kedit.engine.session import Session

    recipes = []
    for path in files:
        try:
            recipes.append(load_recipe(path, Session.registry))
        except RecipeError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(ExitCode.USAGE)
    sessions: dict[tuple, Any] = {}
    report, failed = [], False
    for recipe in recipes:
        options = (model or recipe.model.get("name"), quant or recipe.model.get("quant"),
                   dtype or recipe.model.get("dtype"), device or recipe.model.get("device"))
        if options not in sessions:
            sessions[options] = open_session(*options)
        session = sessions[options]
        if not as_json:
            click.echo(f"{recipe.path} · {session.handle.name}")

        def show(result) -> None:
            if as_json:
                return
            mark = "ok  " if result.ok else "FAIL"
            click.echo(f"  {mark} line {result.step.line}: {result.step.run}")
            for check in result.checks:
                click.echo(f"         {'✓' if check.ok else '✗'} {check.what}")
            if not result.ok:
                click.echo("         output: " + result.text.replace("\n", "\n                 ")[:2000])

        results = replay_recipe(session, recipe, show)
        ok = all(r.ok for r in results)
        failed = failed or not ok
        report.append({"recipe": str(recipe.path), "model": session.handle.name, "ok": ok,
                       "steps": [r.as_dict() for r in results]})
        if not as_json:
            click.echo(f"  {'passed' if ok else 'FAILED'}: {sum(r.ok for r in results)}/{len(results)} steps")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    sys.exit(ExitCode.FAILED if failed else ExitCode.OK)


@main.command("edit")
@click.argument("prompt")
@click.argument("target")
@click.option("--method", default=None, type=click.Choice(["rome", "grace", "wise"]),
              help="Editing method (default: [edit] method in kedit.toml).")
@click.option("--subject", default=None, help="The subject inside the prompt (default: inferred).")
@click.option("--save", "save_to", default=None, type=click.Path(path_type=Path),
              help="Save the edited session to this file (kedit chat: /load it).")
@click.option("--export", "export_to", default=None, type=click.Path(path_type=Path),
              help="Also write the edited model as a transformers folder, or with --gguf a GGUF (ROME only).")
@click.option("--gguf", "as_gguf", is_flag=True,
              help="With --export: write <source>.kedit.gguf (the model's GGUF with the edit merged) instead.")
@click.option("--json", "as_json", is_flag=True, help="Print the edit and its probe as JSON.")
@model_options
def edit_cmd(prompt: str, target: str, method: str | None, subject: str | None, save_to: Path | None,
             export_to: Path | None, as_gguf: bool, as_json: bool, model: str | None, quant: str | None,
             dtype: str | None, device: str | None) -> None:
    """Make one edit, show its probe, and keep the result with --save or --export."""
    from kedit.engine.commands import quote
    from kedit.engine.export import export_model
    from kedit.engine.persist import save_session

    if as_gguf and export_to is None:
        raise click.UsageError("--gguf says how to --export; give --export DIR too")
    session = open_session(model, quant, dtype, device)
    line = f"/edit {quote(prompt)} -> {quote(target)}"
    line += f" --method {method}" if method else ""
    line += f" --subject {quote(subject)}" if subject else ""
    for event in session.run(line):
        if isinstance(event, ev.Error):
            raise click.ClickException(event.message)
        if not as_json and (text := ev.event_text(event)) is not None:
            click.echo(text)
    edit = session.edits[-1]
    try:
        if save_to is not None:
            save_session(session, save_to)
        exported = (export_model(session, export_to, gguf=as_gguf, progress=progress_on_stderr)
                    if export_to is not None else None)
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
    if as_json:
        click.echo(json.dumps({**edit.record(), "saved": str(save_to) if save_to else None,
                               "exported": exported}, indent=2, default=str))


@main.command("eval")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help="EasyEdit-style JSON or JSONL: CounterFact, ZsRE or KnowEdit records.")
@click.option("--method", default=None, type=click.Choice(["rome", "grace", "wise"]),
              help="Editing method (default: [edit] method in kedit.toml).")
@click.option("--sequential", default=None, type=int, metavar="N",
              help="Make the first N edits one after another and measure all after the last "
                   "(default: each edit alone, rolled back before the next).")
@click.option("--limit", default=None, type=int, help="Only the first N records (single mode).")
@click.option("--protocol", default="both", type=click.Choice(["both", "tf", "gen"]), show_default=True,
              help="tf: teacher-forced token accuracy (EasyEdit's); gen: by greedy generation; both.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per record, then the averages.")
@model_options
def eval_cmd(data: Path, method: str | None, sequential: int | None, limit: int | None, protocol: str,
             as_json: bool, model: str | None, quant: str | None, dtype: str | None, device: str | None) -> None:
    """Edit each record of a dataset and measure it by generation (Rel, Para, Chat, Loc) and by
    teacher forcing (Rel, Gen, Loc, Port, as EasyEdit defines them)."""
    from kedit.engine.evaluate import averages, edit_and_measure, read_cases

    if sequential is not None and sequential < 1 or limit is not None and limit < 1:
        raise click.BadParameter("--sequential and --limit take a positive number")
    try:
        cases = read_cases(data, sequential or limit)
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
    session = open_session(model, quant, dtype, device)

    def record(row: dict) -> None:
        if as_json:
            click.echo(json.dumps(row))

    try:
        rows = edit_and_measure(session, cases, method, bool(sequential), progress_on_stderr, record, protocol)
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
    mean = averages(rows)
    mode = f"sequential ({len(rows)} edits, measured after the last)" if sequential else "single (each rolled back)"
    if as_json:
        click.echo(json.dumps({"summary": {"data": str(data), "mode": "sequential" if sequential else "single",
                                           "protocol": protocol, "n": len(rows), **mean}}))
        return
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    click.echo(f"{data}: {len(rows)} record(s), {rows[0]['method'] if rows else method}, {mode}")
    for prefix, label in (("gen_", "by generation"), ("tf_", "teacher-forced")):
        shown = {k.removeprefix(prefix): v for k, v in mean.items() if k.startswith(prefix)}
        if shown:
            click.echo(f"  {label}: " + "  ".join(f"{k.capitalize()} {fmt(v)}" for k, v in shown.items()))


@main.command("export")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--recipe", type=click.Path(path_type=Path), default=None,
              help="Replay this recipe first; the edits and vectors it leaves are exported.")
@click.option("--session", "saved", type=click.Path(path_type=Path), default=None,
              help="Load this saved session (/save) first.")
@click.option("--gguf", "as_gguf", is_flag=True,
              help="Write OUT/<source>.kedit.gguf for llama.cpp/ollama: the GGUF the model was loaded from, "
                   "edits merged, everything else copied byte for byte.")
@click.option("--gguf-type", default="q8_0", show_default=True, type=click.Choice(["q8_0", "source", "f16", "f32"]),
              help="Encoding of the edited GGUF tensors (source: the file's own type, e.g. Q4_1).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@model_options
def export_cmd(out: Path, recipe: Path | None, saved: Path | None, as_gguf: bool, gguf_type: str, as_json: bool,
               model: str | None, quant: str | None, dtype: str | None, device: str | None) -> None:
    """Write an edited model as a transformers folder, or with --gguf as a GGUF file (ROME edits
    merged into the weights)."""
    from kedit.engine.export import export_model
    from kedit.engine.persist import load_session
    from kedit.engine.recipes import RecipeError, load_recipe, replay as replay_recipe
    from kedit.engine.session import Session

    if (recipe is None) == (saved is None):
        raise click.UsageError("give the edits to export: --recipe FILE or --session FILE")
    try:
        steps = load_recipe(recipe, Session.registry) if recipe is not None else None
    except RecipeError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(ExitCode.USAGE)
    session = open_session(model or (steps.model.get("name") if steps else None), quant, dtype, device)
    try:
        if steps is not None:
            failed = [r for r in replay_recipe(session, steps, keep=True) if not r.ok]
            if failed:
                raise KeditError(f"{recipe}: step at line {failed[0].step.line} failed "
                                 f"({[c.what for c in failed[0].checks if not c.ok][0]}); nothing exported")
        else:
            load_session(session, saved)
        done = export_model(session, out, gguf=as_gguf, gguf_type=gguf_type, progress=progress_on_stderr)
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
    if as_json:
        click.echo(json.dumps(done, indent=2))
    elif as_gguf:
        click.echo(f"wrote {done['file']}: {len(done['edits'])} edit(s) merged into {len(done['tensors'])} "
                   f"tensor(s) ({', '.join(t['tensor'] + ' as ' + t['written_type'] for t in done['tensors'])}); "
                   f"vectors: {', '.join(done['vectors']) or 'none'}")
    else:
        click.echo(f"wrote {done['folder']}: {len(done['edits'])} edit(s) merged into "
                   f"{len(done['merged_modules'])} module(s); vectors: {', '.join(done['vectors']) or 'none'}")


def run_lines(session: Any, lines: list[str], as_json: bool = False) -> None:
    """Run slash commands as the REPL would, printing what they print (or, with ``as_json``,
    one JSON array of their events at the end); the first error ends the run with exit code 1."""
    import dataclasses

    from kedit.tui.repl import render

    seen: list[dict] = []
    for line in lines:
        failed: list[ev.Error] = []

        def watch(events):
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


def json_option(fn: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")(fn)


@main.group()
def steer() -> None:
    """Train, measure, merge and convert steering vectors (the /steer commands, scripted)."""


@steer.command("train")
@click.argument("pairs", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--method", default="mean_diff", type=click.Choice(["mean_diff", "pca"]), show_default=True)
@click.option("--layers", default=None, help="Layers to train, e.g. 8-14 or 3,5 (default: all).")
@click.option("--read", default="answer", show_default=True,
              help="Read the completion's mean ('answer') or one token index, e.g. -1.")
@click.option("--strength", default=None, type=float,
              help="The strength the file recommends (default: the largest keeping neutral perplexity within 1.2×).")
@json_option
@model_options
def steer_train(pairs: str, out: str, method: str, layers: str | None, read: str, strength: float | None,
                model: str | None, quant: str | None, dtype: str | None, device: str | None, as_json: bool = False) -> None:
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
@click.option("--neutral", default=None, type=click.Path(dir_okay=False),
              help="Neutral text, one per line (default: text the model writes itself).")
@click.option("--strengths", default="0,1,2,3,4", show_default=True)
@json_option
@model_options
def steer_sweep(vector: str, pairs: str, neutral: str | None, strengths: str, model: str | None,
                quant: str | None, dtype: str | None, device: str | None, as_json: bool = False) -> None:
    """Margin of positive over negative completions, and perplexity, at each strength."""
    from kedit.engine.commands import quote
    from kedit.engine.vector_io import vector_name

    session = open_session(model, quant, dtype, device)
    name = vector_name(vector)
    extra = f" --neutral {quote(neutral)}" if neutral else ""
    run_lines(session, [f"/steer add {quote(vector)} 0",
                        f"/steer sweep {quote(name)} --pairs {quote(pairs)} --strengths {strengths}{extra}"],
              as_json=as_json)


@steer.command("convert")
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@json_option
@model_options
def steer_convert(source: str, out: str, model: str | None, quant: str | None, dtype: str | None,
                  device: str | None, as_json: bool = False) -> None:
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
def steer_merge(vectors: tuple[str, ...], out: str, mode: str, weights: str | None, model: str | None,
                quant: str | None, dtype: str | None, device: str | None, as_json: bool = False) -> None:
    """Merge two or more vectors into one file."""
    from kedit.engine.commands import quote
    from kedit.engine.vector_io import vector_name

    session = open_session(model, quant, dtype, device)
    names = " ".join(quote(vector_name(v)) for v in vectors)
    extra = f" --weights {weights}" if weights else ""
    run_lines(session, [f"/steer add {quote(v)}" for v in vectors]
              + [f"/steer merge {names} --mode {mode}{extra} -> merged", f"/steer save merged {quote(out)}"],
              as_json=as_json)


@main.group(invoke_without_command=True)
@click.option("--shape", default=None,
              help="A random-weight model of this kedit.toml [shapes] entry (qwen2.5-7b, llama-3-8b, mistral-7b, "
                   "bench-small) instead of --model.")
@click.option("--layers", "n_layers", default=None, type=int, help="With --shape: keep only this many layers.")
@click.option("--methods", default="rome,grace,wise", show_default=True, help="Edit methods to time.")
@click.option("--edit-repeats", default=3, show_default=True, help="Timed edits of each method (median).")
@click.option("--vectors", default="1,3", show_default=True, help="Steering vectors racked on every layer.")
@click.option("--active", default="10,100", show_default=True, help="Active edits of each method while generating.")
@click.option("--fill", default="synthetic", show_default=True, type=click.Choice(["synthetic", "real"]),
              help="Active edits: each method's patches with random contents, or real edits.")
@click.option("--tokens", default=64, show_default=True, help="New tokens per timed generation.")
@click.option("--prompt-tokens", default=64, show_default=True, help="Prompt length for generation.")
@click.option("--repeats", default=3, show_default=True, help="Timed generations of each kind (median).")
@click.option("--stats-samples", default=None, type=int, help="ROME's key statistics from this many texts.")
@click.option("--layer", default=None, type=int, help="Edit this layer with every method.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for CI artefacts).")
@model_options
@click.pass_context
def bench(ctx: click.Context, shape: str | None, n_layers: int | None, methods: str, edit_repeats: int,
          vectors: str, active: str, fill: str, tokens: int, prompt_tokens: int, repeats: int,
          stats_samples: int | None, layer: int | None, as_json: bool, model: str | None, quant: str | None,
          dtype: str | None, device: str | None) -> None:
    """Speed and memory, as ratios measured in one run (benchmarks, not tests).

    Without a subcommand: edit time per method (ROME split into key, value and update,
    its key statistics apart), rollback time, tokens/s and time to first token with
    steering vectors and with active edits against plain generation, and peak memory.
    """
    if ctx.invoked_subcommand is not None:
        return
    from kedit.engine.bench import BenchPlan, report_text, run_bench, shape_session
    from kedit.engine.config import Config

    if shape and model:
        raise click.UsageError("give --model or --shape, not both")
    if n_layers is not None and (not shape or n_layers < 1):
        raise click.BadParameter("--layers takes 1 or more, and goes with --shape")
    if min(edit_repeats, tokens, prompt_tokens, repeats) < 1 or tokens < 2:
        raise click.BadParameter("--edit-repeats, --prompt-tokens and --repeats take 1 or more, --tokens 2 or more")
    plan = BenchPlan(methods=tuple(m.strip() for m in methods.split(",") if m.strip()), edit_repeats=edit_repeats,
                     vectors=tuple(v for v in int_list(vectors, "--vectors") if v), active=tuple(
                         a for a in int_list(active, "--active") if a), fill=fill, new_tokens=tokens,
                     prompt_tokens=prompt_tokens, repeats=repeats, stats_samples=stats_samples, layer=layer)
    if shape:
        _quiet_libraries()
        try:
            session = shape_session(Config.load(), shape, n_layers=n_layers, dtype=dtype, device=device, quant=quant,
                                    progress=progress_on_stderr)
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
        raise click.ClickException("the GPU ran out of memory during the bench; try --quant 4bit, fewer "
                                   "--active edits, or --layers with --shape") from None
    click.echo(json.dumps(report, indent=2) if as_json else report_text(report))


@bench.command("steering")
@click.option("--random", "shapes", multiple=True,
              help="Also a random-weight model of this kedit.toml [shapes] entry, e.g. bench-small or qwen2.5-7b.")
@click.option("--random-layers", default=None, type=int, help="Override the random model's layer count.")
@click.option("--vectors", "n_vectors", default=3, show_default=True, help="Vectors racked on every layer.")
@click.option("--tokens", default=64, show_default=True, help="Tokens generated per run.")
@click.option("--repeats", default=3, show_default=True, help="Timed runs of each kind (the median counts).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@model_options
def bench_steering(shapes: tuple[str, ...], random_layers: int | None, n_vectors: int, tokens: int, repeats: int,
                   as_json: bool, model: str | None, quant: str | None, dtype: str | None,
                   device: str | None) -> None:
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
        m = random_model(dims[shape], random_layers, dtype="float32" if session.handle.device == "cpu" else "bfloat16",
                         device=session.handle.device)
        results.append(steering_throughput(m, f"random {shape}", n_vectors, tokens, repeats=repeats))
        del m
    if as_json:
        click.echo(json.dumps([{**vars(r), "ratio": r.ratio} for r in results], indent=2))
        return
    click.echo(f"greedy generation, {tokens} tokens, median of {repeats}; {n_vectors} vectors on every layer")
    for r in results:
        click.echo(f"  {r.label:<28} {r.layers:>3} layers  plain {r.plain_tps:8.1f} tok/s  steered "
                   f"{r.steered_tps:8.1f} tok/s  ratio {r.ratio:.3f}")


@bench.command("tui")
@click.option("--tokens", default=200, show_default=True, help="Length of the streamed reply.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@model_options
def bench_tui(tokens: int, as_json: bool, model: str | None, quant: str | None, dtype: str | None,
              device: str | None) -> None:
    """How the Textual app keeps up while a reply streams: UI loop lag and keystroke echo, idle vs generating."""
    import asyncio

    from kedit.tui.bench_ui import measure

    session = open_session(model, quant, dtype, device)
    session.config = session.config.with_overrides({"generation.max_new_tokens": tokens,
                                                    "generation.min_new_tokens": tokens})
    idle, busy, run = asyncio.run(measure(session, "Where did Watts Humphrey study?"))
    figures = {"idle": idle.summary(), "generating": busy.summary(), **run}
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    click.echo(f"{run['tokens']} tokens streamed in {run['seconds']:.2f} s ({run['tokens_per_s']:.0f} tok/s)")
    for label, r in (("idle", idle), ("generating", busy)):
        f = r.summary()
        click.echo(f"  {label:<11} loop lag median {f['lag_median_ms']:6.2f} ms  p95 {f['lag_p95_ms']:6.2f}  "
                   f"max {f['lag_max_ms']:6.2f} · keystroke echo median {f['echo_median_ms']:6.2f} ms  "
                   f"p95 {f['echo_p95_ms']:6.2f}  max {f['echo_max_ms']:6.2f}  ({int(f['samples'])} keys)")


@main.command("fact-world")
@click.option("--rebuild", is_flag=True, help="Build again even if a cached copy exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def fact_world(rebuild: bool, as_json: bool) -> None:
    """Build (or find) the embedded fact-world model and report its recall."""
    from kedit.engine.config import Config
    from kedit.engine.factworld import build as fw
    from kedit.engine.factworld.recall import recall_report

    _quiet_libraries()
    settings = fw.BuildSettings.from_config(Config.load().table("fact_world"))
    if rebuild:
        folder = fw.build(fw.default_dir(settings), settings, show_progress=sys.stderr.isatty())
    else:
        folder = fw.ensure_built(settings, show_progress=sys.stderr.isatty())
    report = recall_report(folder, settings)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"fact-world model: {folder}")
    click.echo(f"built in {report['build_seconds']:.1f} s; {report['facts']} facts")
    for name, row in report["recall"].items():
        click.echo(f"  {name:<24} recall {row['accuracy']:.3f}  (exact {row['exact']:.3f}, n={row['n']})")


if __name__ == "__main__":  # pragma: no cover
    main()
