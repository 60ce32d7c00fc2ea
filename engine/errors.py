"""Errors a person can act on.

Every error kedit expects a user to cause is a ``KeditError``: its message says
what went wrong and what to do. Fronts print the message, never a traceback.
"""

from __future__ import annotations


class KeditError(Exception):
    """A failure with a message meant for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(KeditError):
    """The model is neither cached, nor a local folder, nor reachable on the hub."""


class UnsupportedArchitecture(KeditError):
    """The model's family has no ArchAdapter."""


class ConfigError(KeditError):
    """A kedit.toml or an environment variable holds a bad value."""
