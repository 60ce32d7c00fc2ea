"""kedit's configuration: shipped defaults, overridden by user, project and environment.

Precedence, highest first: command-line flag > environment (``KEDIT_*``) > ``./kedit.toml``
> the user config dir's ``kedit.toml`` > the ``kedit.toml`` shipped with kedit.
Flags are applied by the fronts through :meth:`Config.with_overrides`.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kedit.engine import paths
from kedit.engine.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHIPPED = Path(__file__).resolve().parent / "kedit.toml"

# Environment variables and the keys they set.
ENV_KEYS = {
    "KEDIT_MODEL": "model.default",
    "KEDIT_QUANT": "model.quant",
    "KEDIT_DTYPE": "model.dtype",
    "KEDIT_DEVICE": "model.device",
    "KEDIT_MAX_NEW_TOKENS": "generation.max_new_tokens",
}


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}. Fix or remove the file.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


# Settings that run code or reach outside kedit: only the user's own config dir or a flag may
# set them, never a kedit.toml in whatever folder kedit was started from.
PRIVILEGED = ("model.trust_remote_code",)


def _without_privileged(layer: dict[str, Any], path: Path, notes: list[str]) -> dict[str, Any]:
    layer = copy.deepcopy(layer)
    for dotted in PRIVILEGED:
        *parents, leaf = dotted.split(".")
        node: Any = layer
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            if node.pop(leaf):
                notes.append(
                    f"{path} asks for {dotted} = true; ignored, as a project folder's kedit.toml may not "
                    f"run a model's own code. Pass --trust-remote-code, or set it in {paths.config_dir() / 'kedit.toml'}"
                )
    return layer


def _coerce(raw: str, like: Any) -> Any:
    """Read an environment string as the type of the default it overrides."""
    if isinstance(like, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    for kind in (int, float):
        if isinstance(like, kind):
            try:
                return kind(raw)
            except ValueError:
                raise ConfigError(f"expected a {kind.__name__}, got {raw!r}") from None
    return raw


class Config:
    """A merged view of every configuration layer, read by dotted keys."""

    def __init__(self, data: dict[str, Any], sources: list[str]) -> None:
        self.data = data
        self.sources = sources
        self.notes: list[str] = []  # settings ignored while loading, for the fronts to show

    @classmethod
    def load(cls, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        data = _read(SHIPPED)
        sources = [str(SHIPPED)]
        notes: list[str] = []
        user = paths.config_dir() / "kedit.toml"
        for path in (user, (cwd or Path.cwd()) / "kedit.toml"):
            if path.is_file() and path.resolve() != SHIPPED.resolve():
                layer = _read(path)
                if path is not user and path.resolve() != user.resolve():
                    layer = _without_privileged(layer, path, notes)
                data = _merge(data, layer)
                sources.append(str(path))
        for var, key in ENV_KEYS.items():
            if env.get(var):
                current = cls(data, sources).get(key)
                try:
                    _set(data, key, _coerce(env[var], current))
                except ConfigError as exc:
                    raise ConfigError(f"{var}: {exc.message}") from None
                sources.append(f"${var}")
        config = cls(data, sources)
        config.notes = notes
        return config

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def table(self, dotted: str) -> dict[str, Any]:
        value = self.get(dotted, {})
        return dict(value) if isinstance(value, Mapping) else {}

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with dotted keys set (None values are ignored): the flags' layer."""
        data = copy.deepcopy(self.data)
        for key, value in overrides.items():
            if value is not None:
                _set(data, key, value)
        config = Config(data, self.sources + ["flags"] if overrides else self.sources)
        config.notes = list(self.notes)
        return config
