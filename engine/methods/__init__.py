"""Editing methods. Each one turns an EditRequest into a Patch: ``apply(session, request, hparams)``."""

from __future__ import annotations

from dataclasses import dataclass, field


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
