"""Where kedit keeps its files: platformdirs' user dirs, overridable by environment."""

from __future__ import annotations

import os
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
