"""The ledger: every edit in force, in order, each with the patch that takes it back out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kedit.engine.errors import KeditError
from kedit.engine.patches import Patch
from kedit.engine.probes import ProbeResult


@dataclass
class Edit:
    """One applied edit: the request, how it was made, its patch and its probe."""

    id: str
    method: str
    prompt: str
    subject: str
    target: str
    patch: Patch
    layer: int | None = None
    subject_how: str = "given"
    hparams: dict[str, Any] = field(default_factory=dict)
    info: Any = None  # the method's MethodInfo: what computing the edit measured
    probe: ProbeResult | None = None
    paraphrases: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    seconds: float = 0.0
    question: str | None = None  # the fact asked in chat, for the generation-based probe
    facts: list[dict[str, Any]] = field(default_factory=list)  # a batch edit's facts (prompt, subject, target, ...)

    @property
    def is_batch(self) -> bool:
        return bool(self.facts)

    @property
    def title(self) -> str:
        """The edit in a few words: its prompt and target, or its batch's size and first fact."""
        if self.is_batch:
            return f"batch of {len(self.facts)} fact(s): {self.prompt} →{self.target}, …"
        return f"{self.prompt} →{self.target}"

    def record(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-ready data."""
        return {
            "id": self.id,
            "method": self.method,
            "prompt": self.prompt,
            "subject": self.subject,
            "target": self.target,
            "layer": self.layer,
            "subject_how": self.subject_how,
            "hparams": self.hparams,
            "info": self.info.as_dict() if self.info is not None else {},
            "paraphrases": self.paraphrases,
            "question": self.question,
            "facts": self.facts,
            "probe": self.probe.as_dict() if self.probe else None,
            "created": self.created,
            "seconds": self.seconds,
        }


class Ledger:
    """Edits in the order they were applied; ids are never reused within a session."""

    def __init__(self) -> None:
        self.edits: list[Edit] = []
        self._counter = 0

    def next_id(self) -> str:
        self._counter += 1
        return f"e{self._counter}"

    def add(self, edit: Edit) -> None:
        self.edits.append(edit)

    def get(self, edit_id: str) -> Edit:
        key = edit_id if edit_id.startswith("e") else f"e{edit_id}"
        for e in self.edits:
            if e.id == key:
                return e
        batch, dot, fact = key.partition(".")
        whole = next((e for e in self.edits if e.id == batch), None) if dot else None
        if whole is not None and whole.is_batch:
            raise KeditError(
                f"{key} is fact {fact} of {whole.id}, a batch of {len(whole.facts)} facts solved together: "
                f"its update is one least-squares solution for all of them, and no part of it belongs to one "
                f"fact. /rollback {whole.id} takes the whole batch out exactly; then edit the batch again "
                "without that fact (/edit --file)"
            )
        known = ", ".join(e.id for e in self.edits) or "none"
        raise KeditError(f"no edit {edit_id!r} is in force (edits: {known}); /edits lists them")

    def remove(self, edit_id: str) -> Edit:
        """Revert one edit's patch and drop it from the ledger."""
        edit = self.get(edit_id)
        edit.patch.revert()
        self.edits.remove(edit)
        return edit

    @property
    def counter(self) -> int:
        """How many ids were handed out: a loaded session goes on from there."""
        return self._counter

    def restart(self) -> None:
        """Ids start again from e1: only with no edit in force (a recipe starts from the model as loaded)."""
        if self.edits:
            raise KeditError("ids can start again only with no edit in force")
        self._counter = 0

    def bump(self, counter: int) -> None:
        self._counter = max(self._counter, counter)

    def __len__(self) -> int:
        return len(self.edits)

    def __iter__(self):
        return iter(self.edits)
