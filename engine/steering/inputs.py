"""Steering's inputs as a user gives them: contrastive pairs and texts in files, and the
strengths, layers and read position written in a command."""

from __future__ import annotations

import json
from pathlib import Path

from kedit.engine.errors import KeditError
from kedit.engine.steering.train import Pair


def parse_floats(text: str, what: str) -> list[float]:
    """'1,0.5' or '2' -> numbers, with an error naming ``what`` for anything else."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise KeditError(f"{what}: numbers separated by commas, e.g. 1,0.5, not {text!r}") from None


def parse_read(text: str) -> str | int:
    """Training's read position: 'answer', or a token index such as -1."""
    if text == "answer":
        return text
    try:
        return int(text)
    except ValueError:
        raise KeditError(f"--read is 'answer' or a token index such as -1, not {text!r}") from None


def read_texts(path: Path) -> list[str]:
    """One text per non-empty line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KeditError(f"no text file at {path}")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise KeditError(f"{path} has no text")
    return texts


def parse_layers(text: str | None) -> list[int] | None:
    """'8-14', '3,5,7' or '4' -> layer indices; None stays None."""
    if text is None:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise KeditError(f"layers look like 8-14 or 3,5,7, not {text!r}") from None
    return out


def read_pairs(path: Path) -> list[Pair]:
    """Contrastive pairs from JSONL: one {"prompt", "positive", "negative"} object per line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KeditError(f"no pairs file at {path}")
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append(Pair(row["prompt"], row["positive"], row["negative"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise KeditError(f"{path}:{n}: expected a JSON object with prompt, positive and negative ({exc})") from None
    return pairs
