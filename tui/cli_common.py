"""What the ``kedit`` commands share: exit codes, the model options, and opening a session.

Every option two commands share is defined here once; cli.py, cli_bench.py and cli_steer.py
import it.
"""

from __future__ import annotations

import logging
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
    # the hub client logs every retry of an unreachable host; kedit explains the failure once
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


_TRUST: list[bool] = [False]  # --trust-remote-code, read by open_session


def _trust(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    _TRUST[0] = bool(value)


def model_options(fn: Any) -> Any:
    """The options every model-loading command shares."""
    fn = click.option(
        "--trust-remote-code",
        is_flag=True,
        expose_value=False,
        callback=_trust,
        help="Run the Python code a model folder ships (only for models you trust).",
    )(fn)
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


def session_config() -> Any:
    """kedit.toml's layers with --trust-remote-code applied; settings a project folder's
    kedit.toml may not make are reported on stderr."""
    from kedit.engine.config import Config

    config = Config.load()
    for note in config.notes:
        click.echo(f"kedit: {note}", err=True)
    return config.with_overrides({"model.trust_remote_code": True}) if _TRUST[0] else config


def open_session(model: str | None, quant: str | None, dtype: str | None, device: str | None):
    """The engine's session for the model options; a model that fails to load exits 1 with its message."""
    from kedit.engine.session import Session

    quiet_libraries()
    try:
        return Session.open(
            model, quant=quant, dtype=dtype, device=device, config=session_config(), show_progress=sys.stderr.isatty()
        )
    except KeditError as exc:
        raise click.ClickException(exc.message) from None
