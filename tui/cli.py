"""The ``kedit`` command line (click): thin commands over the engine.

Data goes to stdout, diagnostics to stderr. A mistake a user made exits 1 with a
message and no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from kedit.engine import events as ev
from kedit.engine.errors import KeditError
from kedit.tui.cli_bench import bench
from kedit.tui.cli_common import (
    ExitCode,
    method_option,
    model_options,
    open_session,
    progress_on_stderr,
    quiet_libraries,
    session_config,
)
from kedit.tui.cli_steer import steer


class _Guarded(click.Group):
    """The CLI's safety net: a failure nothing foresaw is one line naming the log that holds
    its traceback, and exit code 1, never a traceback on the terminal."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except KeditError as exc:
            raise click.ClickException(exc.message) from None
        except Exception as exc:  # noqa: BLE001 - the net itself
            from kedit.engine.session import log_failure

            where = log_failure(" ".join(sys.argv), exc)
            raise click.ClickException(
                f"kedit failed ({type(exc).__name__}: {exc}); the details are in {where}"
            ) from None


@click.group(cls=_Guarded, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kedit")
def main() -> None:
    """kedit: edit a language model while you talk to it."""


main.add_command(bench)
main.add_command(steer)


@main.command()
@model_options
@click.option("--resume", is_flag=True, help="Load the edits and chat of the last session (its journal) first.")
def chat(model: str | None, quant: str | None, dtype: str | None, device: str | None, resume: bool) -> None:
    """Chat with a model in a REPL; slash commands edit and inspect it.

    With stdin not a terminal, each input line is one turn:
    printf 'Watts Humphrey attended\\n/quit\\n' | kedit chat

    The session is journalled after every change; after a crash or a kill,
    kedit chat --resume (with the same --model) brings it back.
    """
    from kedit.tui import repl

    session = open_session(model, quant, dtype, device)
    sys.exit(repl.main(session, resume))


@main.command()
@model_options
def tui(model: str | None, quant: str | None, dtype: str | None, device: str | None) -> None:
    """The Textual workbench: chat, and panels for edits, steering and probes.

    The model loads in the background; the app is usable at once.
    """
    from kedit.engine.session import Session
    from kedit.tui import app

    quiet_libraries()
    try:
        config = session_config()
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
    sys.exit(
        app.main(
            lambda: Session.open(model, quant=quant, dtype=dtype, device=device, config=config, show_progress=False)
        )
    )


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report instead.")
@model_options
def replay(
    files: tuple[Path, ...], as_json: bool, model: str | None, quant: str | None, dtype: str | None, device: str | None
) -> None:
    """Replay recipes (TOML files of commands and expectations).

    Exit code 0: every expectation held; 1: one failed; 2: a recipe is malformed
    (the message names the file and the line). --model replaces each recipe's model.
    """
    from kedit.engine.recipes import RecipeError, load_recipe
    from kedit.engine.recipes import replay as replay_recipe
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
        options = (
            model or recipe.model.get("name"),
            quant or recipe.model.get("quant"),
            dtype or recipe.model.get("dtype"),
            device or recipe.model.get("device"),
        )
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
        report.append(
            {
                "recipe": str(recipe.path),
                "model": session.handle.name,
                "ok": ok,
                "steps": [r.as_dict() for r in results],
            }
        )
        if not as_json:
            click.echo(f"  {'passed' if ok else 'FAILED'}: {sum(r.ok for r in results)}/{len(results)} steps")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    sys.exit(ExitCode.FAILED if failed else ExitCode.OK)


@main.command("edit")
@click.argument("prompt", required=False)
@click.argument("target", required=False)
@click.option(
    "--file",
    "facts_file",
    default=None,
    type=click.Path(path_type=Path),
    help="Edit a file of facts (EasyEdit/CounterFact JSON or JSONL, or real-facts JSONL) as one batch "
    "with a batch method (memit, alphaedit), instead of PROMPT and TARGET.",
)
@method_option
@click.option("--subject", default=None, help="The subject inside the prompt (default: inferred).")
@click.option(
    "--save",
    "save_to",
    default=None,
    type=click.Path(path_type=Path),
    help="Save the edited session to this file (kedit chat: /load it).",
)
@click.option(
    "--export",
    "export_to",
    default=None,
    type=click.Path(path_type=Path),
    help="Also write the edited model as a transformers folder, or with --gguf a GGUF (ROME only).",
)
@click.option(
    "--gguf",
    "as_gguf",
    is_flag=True,
    help="With --export: write <source>.kedit.gguf (the model's GGUF with the edit merged) instead.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the edit and its probe as JSON.")
@model_options
def edit_cmd(
    prompt: str | None,
    target: str | None,
    facts_file: Path | None,
    method: str | None,
    subject: str | None,
    save_to: Path | None,
    export_to: Path | None,
    as_gguf: bool,
    as_json: bool,
    model: str | None,
    quant: str | None,
    dtype: str | None,
    device: str | None,
) -> None:
    """Make one edit (or a batch with --file), show its probe, and keep the result with --save or --export."""
    from kedit.engine.edit_commands import batch_table, probe_table
    from kedit.engine.evaluate import read_cases
    from kedit.engine.export import export_model
    from kedit.engine.persist import save_session

    if as_gguf and export_to is None:
        raise click.UsageError("--gguf says how to --export; give --export DIR too")
    if facts_file is not None and (prompt or target or subject):
        raise click.UsageError("give PROMPT and TARGET, or --file FACTS, not both")
    if facts_file is None and not (prompt and target):
        raise click.UsageError("give PROMPT and TARGET, or --file FACTS")
    try:
        cases = read_cases(facts_file) if facts_file is not None else None
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
    session = open_session(model, quant, dtype, device)
    try:
        if cases is not None:
            edit = session.edit_batch(cases, method=method, progress=progress_on_stderr)
        else:
            assert prompt is not None and target is not None
            edit = session.edit(prompt, target, subject=subject, method=method, progress=progress_on_stderr)
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
    if not as_json:
        click.echo(ev.event_text(batch_table(edit) if edit.is_batch else probe_table(edit)))
    try:
        if save_to is not None:
            save_session(session, save_to)
        exported = (
            export_model(session, export_to, gguf=as_gguf, progress=progress_on_stderr)
            if export_to is not None
            else None
        )
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
    if as_json:
        click.echo(
            json.dumps(
                {**edit.record(), "saved": str(save_to) if save_to else None, "exported": exported},
                indent=2,
                default=str,
            )
        )


@main.command("eval")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(path_type=Path),
    help="EasyEdit-style JSON or JSONL: CounterFact, ZsRE or KnowEdit records; or insertion:N, "
    "N generated facts about invented people (kedit.engine.insertion).",
)
@method_option
@click.option(
    "--sequential",
    default=None,
    type=int,
    metavar="N",
    help="Make the first N edits one after another and measure all after the last "
    "(default: each edit alone, rolled back before the next).",
)
@click.option(
    "--batch",
    default=None,
    type=int,
    metavar="B",
    help="With --sequential: edit in batches of B facts with a batch method (memit, alphaedit), or "
    "one by one with --batch 1 (rome, grace, wise); then report both protocols, perplexity on "
    "neutral text, edits per minute and exact rollback.",
)
@click.option(
    "--locality",
    "locality_file",
    default=None,
    type=click.Path(path_type=Path),
    help="With --batch: a real-facts JSONL whose facts (completion and chat) the edits must keep.",
)
@click.option("--limit", default=None, type=int, help="Only the first N records (single mode).")
@click.option(
    "--protocol",
    default="both",
    type=click.Choice(["both", "tf", "gen"]),
    show_default=True,
    help="tf: teacher-forced token accuracy (EasyEdit's); gen: by greedy generation; both.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON line per record, then the averages.")
@model_options
def eval_cmd(
    data: Path,
    method: str | None,
    sequential: int | None,
    batch: int | None,
    locality_file: Path | None,
    limit: int | None,
    protocol: str,
    as_json: bool,
    model: str | None,
    quant: str | None,
    dtype: str | None,
    device: str | None,
) -> None:
    """Edit each record of a dataset and measure it by generation (Rel, Para, Chat, Loc) and by
    teacher forcing (Rel, Gen, Loc, Port, as EasyEdit defines them)."""
    from kedit.engine.evaluate import averages, edit_and_measure, read_cases

    if sequential is not None and sequential < 1 or limit is not None and limit < 1:
        raise click.BadParameter("--sequential and --limit take a positive number")
    if (batch is not None or locality_file is not None) and sequential is None:
        raise click.BadParameter("--batch and --locality go with --sequential N")
    try:
        cases = _eval_cases(data, sequential or limit)
        others = read_cases(locality_file) if locality_file is not None else []
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
    session = open_session(model, quant, dtype, device)
    if batch is not None:
        _eval_batches(session, data, cases, method, batch, others, as_json)
        return

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
        click.echo(
            json.dumps(
                {
                    "summary": {
                        "data": str(data),
                        "mode": "sequential" if sequential else "single",
                        "protocol": protocol,
                        "n": len(rows),
                        **mean,
                    }
                }
            )
        )
        return
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    click.echo(f"{data}: {len(rows)} record(s), {rows[0]['method'] if rows else method}, {mode}")
    for prefix, label in (("gen_", "by generation"), ("tf_", "teacher-forced")):
        shown = {k.removeprefix(prefix): v for k, v in mean.items() if k.startswith(prefix)}
        if shown:
            click.echo(f"  {label}: " + "  ".join(f"{k.capitalize()} {fmt(v)}" for k, v in shown.items()))


def _eval_cases(data: Path, limit: int | None) -> list:
    """The records of --data: a file, or insertion:N (N generated facts)."""
    from kedit.engine.evaluate import insertion_cases, read_cases

    name = str(data)
    if not name.startswith("insertion:"):
        return read_cases(data, limit)
    count = name.removeprefix("insertion:")
    if not count.isdigit():
        raise KeditError(f"--data insertion:N takes a number of facts, not {count!r}")
    cases = insertion_cases(int(count))
    return cases[:limit] if limit else cases


def _eval_batches(
    session, data: Path, cases: list, method: str | None, batch: int, others: list, as_json: bool
) -> None:
    from kedit.engine.evaluate import edit_in_batches

    try:
        result = edit_in_batches(session, cases, method, batch, progress_on_stderr, others)
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
    if as_json:
        click.echo(json.dumps({"summary": {"data": str(data), "mode": "batches", **result}}))
        return
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    per = result["seconds_per_batch"]
    click.echo(
        f"{data}: {result['n']} facts, {result['method']}, {result['batches']} batch(es) of {batch}, "
        "measured after the last"
    )
    click.echo(
        f"  by generation: Rel {fmt(result['gen_rel'])}  Para {fmt(result['gen_para'])}  "
        f"Chat {fmt(result['gen_chat'])}  Loc {fmt(result['gen_loc'])}  Loc chat {fmt(result['gen_loc_chat'])}"
    )
    if result["batches"] > 1:
        click.echo("  Rel by batch, oldest first: " + " ".join(f"{x:.2f}" for x in result["gen_rel_by_batch"]))
    click.echo(
        f"  teacher-forced: Rel {fmt(result['tf_rel'])}  Gen {fmt(result['tf_gen'])}  Loc {fmt(result['tf_loc'])}"
    )
    click.echo(
        f"  perplexity on neutral text: {result['ppl_before']:.2f} unedited, {result['ppl_after']:.2f} edited "
        f"(× {result['ppl_ratio']:.3f})"
    )
    click.echo(
        f"  time: {sum(per) / len(per):.1f} s per batch (median {sorted(per)[len(per) // 2]:.1f} s), "
        f"{fmt(result['edits_per_minute'])} edits a minute"
    )
    click.echo(
        f"  rollback of every batch: logits {'equal' if result['rollback_exact'] else 'NOT equal'} to the unedited model's"
    )
    for label, key in (("completed", "loc_lost"), ("asked in chat", "loc_chat_lost")):
        for prompt, said in result[key]:
            click.echo(f"  lost its answer, {label}: {prompt!r} → {said.strip()[:60]!r}")


@main.command("export")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--recipe",
    type=click.Path(path_type=Path),
    default=None,
    help="Replay this recipe first; the edits and vectors it leaves are exported.",
)
@click.option(
    "--session", "saved", type=click.Path(path_type=Path), default=None, help="Load this saved session (/save) first."
)
@click.option(
    "--gguf",
    "as_gguf",
    is_flag=True,
    help="Write OUT/<source>.kedit.gguf for llama.cpp/ollama: the GGUF the model was loaded from, "
    "edits merged, everything else copied byte for byte.",
)
@click.option(
    "--gguf-type",
    default="q8_0",
    show_default=True,
    type=click.Choice(["q8_0", "source", "f16", "f32"]),
    help="Encoding of the edited GGUF tensors (source: the file's own type, e.g. Q4_1).",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@model_options
def export_cmd(
    out: Path,
    recipe: Path | None,
    saved: Path | None,
    as_gguf: bool,
    gguf_type: str,
    as_json: bool,
    model: str | None,
    quant: str | None,
    dtype: str | None,
    device: str | None,
) -> None:
    """Write an edited model as a transformers folder, or with --gguf as a GGUF file (ROME edits
    merged into the weights)."""
    from kedit.engine.export import export_model
    from kedit.engine.persist import load_session
    from kedit.engine.recipes import RecipeError, load_recipe
    from kedit.engine.recipes import replay as replay_recipe
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
                raise KeditError(
                    f"{recipe}: step at line {failed[0].step.line} failed "
                    f"({[c.what for c in failed[0].checks if not c.ok][0]}); nothing exported"
                )
        else:
            load_session(session, saved)
        done = export_model(session, out, gguf=as_gguf, gguf_type=gguf_type, progress=progress_on_stderr)
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
    if as_json:
        click.echo(json.dumps(done, indent=2))
    elif as_gguf:
        click.echo(
            f"wrote {done['file']}: {len(done['edits'])} edit(s) merged into {len(done['tensors'])} "
            f"tensor(s) ({', '.join(t['tensor'] + ' as ' + t['written_type'] for t in done['tensors'])}); "
            f"vectors: {', '.join(done['vectors']) or 'none'}"
        )
    else:
        click.echo(
            f"wrote {done['folder']}: {len(done['edits'])} edit(s) merged into "
            f"{len(done['merged_modules'])} module(s); vectors: {', '.join(done['vectors']) or 'none'}"
        )


@main.command("fact-world")
@click.option(
    "--rebuild",
    is_flag=True,
    help="Train a copy from the recipe into the cache and report on it (sessions keep the shipped model).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def fact_world(rebuild: bool, as_json: bool) -> None:
    """Find (or build) the embedded fact-world model and report its recall."""
    from kedit.engine.config import Config
    from kedit.engine.factworld import build as fw
    from kedit.engine.factworld.recall import recall_report

    quiet_libraries()
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
