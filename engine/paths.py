"""Where kedit keeps its files: platformdirs' user dirs, overridable by environment."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs

APP = "kedit"


def cache_dir() -> Path:
    """Built models, key statistics and other things that can be rebuilt (KEDIT_CACHE_DIR)."""
    return Path(os.environ.get("KEDIT_CACHE_DIR") or platformdirs.user_cache_dir(APP))


def data_dir() -> Path:
    """History and saved sessions (KEDIT_DATA_DIR)."""
    return Path(os.environ.get("KEDIT_DATA_DIR") or platformdirs.user_data_dir(APP))


def config_dir() -> Path:
    """The user's kedit.toml (KEDIT_CONFIG_DIR)."""
    return Path(os.environ.get("KEDIT_CONFIG_DIR") or platformdirs.user_config_dir(APP))


def state_dir() -> Path:
    """Logs of unexpected failures and the chat journal (KEDIT_STATE_DIR)."""
    return Path(os.environ.get("KEDIT_STATE_DIR") or platformdirs.user_state_dir(APP))


STALE_SECONDS = 600  # a temporary file this old beside a target is left from a killed write


def _sweep_stale(path: Path) -> None:
    """Remove temporary files that writes to ``path`` killed half-way left behind."""
    import time

    for old in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if time.time() - old.stat().st_mtime > STALE_SECONDS:
                old.unlink()
        except OSError:
            pass


@contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """A temporary file beside ``path`` to write to; on success it replaces ``path`` in one
    step (flushed to disk first, with the permissions a new file gets), on failure it is gone.
    Readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
