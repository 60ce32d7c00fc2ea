"""Editing methods. Each one turns an EditRequest into a Patch: ``apply(session, request, hparams)``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from kedit.engine.errors import ConfigError


@dataclass(frozen=True)
class EditRequest:
    """What the user asked to change: after ``prompt``, the model should say ``target``."""

    prompt: str  # brackets removed
    subject: str
    target: str  # with the leading space a continuation needs
    paraphrases: tuple[str, ...] = field(default_factory=tuple)


def as_continuation(prompt: str, target: str) -> str:
    """The target as the text that follows the prompt: one space between them, as EasyEdit does."""
    target = target.strip()
    return target if prompt.endswith((" ", "\n")) else " " + target


def read_params(cls: type, config: Any, section: str, model_type: str, model_id: str,
                skip: tuple[str, ...] = ()) -> Any:
    """A method's hyperparameters from kedit.toml: [section], then [section.family.<model_type>],
    then [section.model."<model id>"], each overriding the one before; unknown keys are refused."""
    base = config.table(section)
    table: dict[str, Any] = {k: v for k, v in base.items() if not isinstance(v, dict) and k not in skip}
    table.update(base.get("family", {}).get(model_type, {}))
    table.update(base.get("model", {}).get(model_id, {}))
    names = {f.name for f in fields(cls)}
    unknown = set(table) - names
    if unknown:
        raise ConfigError(f"unknown {section} setting(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(names))}")
    return cls(**table)
