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
from typing import Any

import click

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
