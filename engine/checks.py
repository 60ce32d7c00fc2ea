"""Input checked at the boundary: paths, numbers and text a user typed or a file held, each
refused with a message that names what was wrong, before anything changes."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from kedit.engine.errors import KeditError

MAX_NAME_BYTES = 255  # one path component (most file systems)
MAX_PATH_BYTES = 4096  # a whole path (Linux PATH_MAX)
MAX_TEXT_FILE = 64 << 20  # a text file kedit reads whole: facts, pairs, recipes
SYSTEM_TREES = ("/proc", "/sys", "/dev")

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe to show in a terminal: control characters (escape sequences among them)
    written as \\xNN, and over ``limit`` characters cut with a count of the rest."""
    shown = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    if len(shown) > limit:
        shown = f"{shown[:limit]}… ({len(text)} characters)"
    return shown


def user_path(text: str, what: str = "the path") -> Path:
    """A path as typed: not empty, no NUL or control characters, within the system's lengths."""
    if not text or not text.strip():
        raise KeditError(f"{what} is empty")
    if _CONTROL.search(text):
        raise KeditError(f"{what} holds control characters: {printable(text, 80)}")
    path = Path(text).expanduser()
    if len(os.fsencode(str(path))) > MAX_PATH_BYTES:
        raise KeditError(f"{what} is longer than {MAX_PATH_BYTES} bytes")
    for part in path.parts:
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise KeditError(f"{what} has a name longer than {MAX_NAME_BYTES} bytes: {printable(part, 40)}")
    return path


def _in_system_tree(path: Path) -> str | None:
    real = os.path.realpath(path)
    return next((t for t in SYSTEM_TREES if real == t or real.startswith(t + "/")), None)


def input_file(text: str | Path, what: str = "the file", max_bytes: int | None = None) -> Path:
    """A file to read: exists, is a regular file, and (with ``max_bytes``) not larger than that."""
    path = user_path(str(text), what)
    if path.is_dir():
        raise KeditError(f"{what} {printable(str(path))} is a folder, not a file")
    if not path.is_file():
        raise KeditError(f"no {what.removeprefix('the ')} at {printable(str(path))}")
    if _in_system_tree(path):
        raise KeditError(f"{what} {printable(str(path))} is a system file, not one of yours")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise KeditError(f"{what} {printable(str(path))} is larger than {max_bytes >> 20} MiB")
    return path


def output_path(text: str | Path, what: str = "the destination", folder: bool = False) -> Path:
    """Somewhere to write: not a system tree, and not a folder where a file goes (or a file
    where a folder goes)."""
    path = user_path(str(text), what)
    tree = _in_system_tree(path)
    if tree:
        raise KeditError(
            f"{what} {printable(str(path))} is inside {tree}, which the system owns: choose a path of your own"
        )
    if not folder and path.is_dir():
        raise KeditError(f"{what} {printable(str(path))} is a folder: give a file name")
    if folder and path.exists() and not path.is_dir():
        raise KeditError(f"{what} {printable(str(path))} is a file: give a folder")
    return path


def read_text(text: str | Path, what: str = "the file") -> str:
    """A text file's contents, UTF-8, at most MAX_TEXT_FILE bytes."""
    path = input_file(text, what, MAX_TEXT_FILE)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KeditError(
            f"{what} {printable(str(path))} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise KeditError(f"cannot read {what} {printable(str(path))}: {exc.strerror or exc}") from None


def finite(value: float, what: str, low: float | None = None, high: float | None = None) -> float:
    """``value`` if it is a finite number within [low, high]."""
    if not math.isfinite(value):
        raise KeditError(f"{what} must be a finite number, not {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = (
            f"between {low:g} and {high:g}"
            if low is not None and high is not None
            else (f"at least {low:g}" if low is not None else f"at most {high:g}")
        )
        raise KeditError(f"{what} must be {span}, not {value:g}")
    return value
