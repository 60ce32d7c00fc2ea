"""The conversation's turns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Message:
    """One turn of the conversation."""

    role: str  # "user" | "assistant" | "system"
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}
