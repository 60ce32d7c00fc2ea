"""Every slash command, registered by its module. The REPL, the TUI, recipes and /help read
them from here; importing this module is what registers them."""

from __future__ import annotations

from kedit.engine import edit_commands, session_commands, steer_commands  # noqa: F401  (they register)
from kedit.engine.commands import REGISTRY, Registry


def registry() -> Registry:
    """The registry with every command in it."""
    return REGISTRY
