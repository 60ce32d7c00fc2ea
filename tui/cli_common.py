"""What the ``kedit`` commands share: exit codes, the model options, and opening a session.

Every option two commands share is defined here once; cli.py, cli_bench.py and cli_steer.py
import it.
"""

from __future__ import annotations

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


def quiet_libraries() -> None:
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
    fn = click.option(
        "--dtype",
        default=None,
        type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
        help="Weight dtype (auto: float32 on CPU, the checkpoint's on GPU).",
    )(fn)
    fn = click.option(
        "--quant",
        default=None,
        type=click.Choice(["4bit", "8bit"]),
        envvar="KEDIT_QUANT",
        help="Load with bitsandbytes 4-bit or 8-bit weights.",
    )(fn)
    fn = click.option(
        "-m",
        "--model",
        default=None,
        envvar="KEDIT_MODEL",
        help="Alias, hub id or local folder (default: the embedded fact-world model).",
    )(fn)
    return fn


def method_option(fn: Any) -> Any:
    """--method: one of the engine's editing methods (kedit.engine.methods.table)."""
    from kedit.engine.methods.table import METHODS

    return click.option(
        "--method",
        default=None,
        type=click.Choice(list(METHODS)),
        help="Editing method (default: [edit] method in kedit.toml).",
    )(fn)


def json_option(fn: Any) -> Any:
    """--json: print the results as JSON (``as_json``)."""
    return click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")(fn)


def progress_on_stderr(label: str, done: int, total: int) -> None:
    """A one-line counter for long steps, on a terminal only (stdout keeps the data)."""
    if sys.stderr.isatty():
        click.echo(f"\r\033[K{label}: {done}/{total}", err=True, nl=False)
        if done >= total:
            click.echo("\r\033[K", err=True, nl=False)


def open_session(model: str | None, quant: str | None, dtype: str | None, device: str | None):
    """The engine's session for the model options; a model that fails to load exits 1 with its message."""
    from kedit.engine.session import Session

    quiet_libraries()
    try:
        return Session.open(model, quant=quant, dtype=dtype, device=device, show_progress=sys.stderr.isatty())
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
