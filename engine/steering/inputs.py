"""Steering's inputs as a user gives them: contrastive pairs and texts in files, and the
strengths, layers and read position written in a command."""

from __future__ import annotations

import json
from pathlib import Path

from kedit.engine.checks import finite, printable, read_text
from kedit.engine.errors import KeditError
from kedit.engine.steering.train import Pair

MAX_STRENGTH = 1e6  # beyond this any strength or weight only turns the model's output to noise


def parse_floats(text: str, what: str) -> list[float]:
    """'1,0.5' or '2' -> numbers, with an error naming ``what`` for anything else."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise KeditError(f"{what}: numbers separated by commas, e.g. 1,0.5, not {printable(text, 60)!r}") from None
    for value in values:
        finite(value, what, -MAX_STRENGTH, MAX_STRENGTH)
    return values


def parse_read(text: str) -> str | int:
    """Training's read position: 'answer', or a token index such as -1."""
    if text == "answer":
        return text
    try:
        return int(text)
    except ValueError:
        raise KeditError(f"--read is 'answer' or a token index such as -1, not {printable(text, 60)!r}") from None


def read_texts(path: Path) -> list[str]:
    """One text per non-empty line."""
    text = read_text(path, "the text file")
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise KeditError(f"{printable(str(path))} has no text")
    return texts


def parse_layers(text: str | None) -> list[int] | None:
    """'8-14', '3,5,7' or '4' -> layer indices; None stays None."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            if b and int(b) < int(a):
                raise KeditError(f"the layer range {part.strip()} runs backwards: write {int(b)}-{int(a)}")
            if int(a) < 0:
                raise ValueError(a)
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise KeditError(f"layers look like 8-14 or 3,5,7, not {printable(text, 60)!r}") from None
    if not out or len(out) > 4096:
        raise KeditError(f"layers look like 8-14 or 3,5,7, not {printable(text, 60)!r}")
    return out


def read_pairs(path: Path) -> list[Pair]:
    """Contrastive pairs from JSONL: one {"prompt", "positive", "negative"} object per line."""
    pairs = []
    for n, line in enumerate(read_text(path, "the pairs file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts = (row["prompt"], row["positive"], row["negative"])
            if not all(isinstance(t, str) for t in texts):
                raise TypeError("prompt, positive and negative must be text")
            pairs.append(Pair(*texts))
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as exc:
            raise KeditError(
                f"{printable(str(path))}:{n}: expected a JSON object with prompt, positive and negative ({exc})"
            ) from None
    return pairs
