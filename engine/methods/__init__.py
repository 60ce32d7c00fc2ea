"""Editing methods. Each one turns an EditRequest into a Patch: ``apply(session, request, hparams)``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

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


class MethodParams:
    """Base of a method's frozen hyperparameter dataclass, read from kedit.toml: [section],
    then [section.family.<model_type>], then [section.model."<model id>"], each overriding the
    one before; unknown keys are refused. Subclasses set ``section`` (and ``skip``, keys of
    the section that are not hyperparameters)."""

    section: ClassVar[str]
    skip: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, config: Any, model_type: str, model_id: str) -> Any:
        base = config.table(cls.section)
        table: dict[str, Any] = {k: v for k, v in base.items() if not isinstance(v, dict) and k not in cls.skip}
        table.update(base.get("family", {}).get(model_type, {}))
        table.update(base.get("model", {}).get(model_id, {}))
        names = {f.name for f in fields(cls)}
        unknown = set(table) - names
        if unknown:
            raise ConfigError(f"unknown {cls.section} setting(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(names))}")
        return cls(**table)

    def with_(self, **changes: Any) -> Any:
        """A copy with the given settings (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
