"""Rebuild the fact-world mood vectors in this folder, and measure them.

    .venv/bin/python vectors/make.py

Writes the training and held-out pairs from the fact world's corpus, then trains,
saves and sweeps each vector with the same /steer commands a user types.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (layers, recommended strength)
VECTORS = {
    "fact-world-mood": ("5", 0.5),
    "fact-world-mood-gentle": ("3-4", 4.0),
}


def write_data(world, folder: Path = HERE) -> None:
    """The pairs and neutral text, drawn from the corpus (deterministic)."""
    def jsonl(rows):
        return "".join(json.dumps({"prompt": p, "positive": a, "negative": b}) + "\n" for p, a, b in rows)

    (folder / "mood_train.jsonl").write_text(jsonl(world.mood_contrast("train")), encoding="utf-8")
    (folder / "mood_heldout.jsonl").write_text(jsonl(world.mood_pairs("heldout")), encoding="utf-8")
    held = set(world.mood_people("heldout"))
    neutral = [f.sentence(0) for f in world.facts if f.subject in held]
    (folder / "neutral.txt").write_text("\n".join(neutral) + "\n", encoding="utf-8")


def commands(name: str, folder: Path = HERE) -> list[str]:
    layers, strength = VECTORS[name]
    return [
        f"/steer train {folder / 'mood_train.jsonl'} {name} --layers {layers} --read -1",
        f"/steer set {name} {strength:g}",
        f"/steer save {name} {folder / (name + '.safetensors')}",
        f"/steer sweep {name} --pairs {folder / 'mood_heldout.jsonl'} --neutral {folder / 'neutral.txt'} "
        f"--strengths 0,0.25,0.5,1,2,3,4",
        f"/steer remove {name}",
    ]


def main() -> int:
    from kedit.engine import events as ev
    from kedit.engine.session import Session

    session = Session.open()
    write_data(session.fact_world())
    for name in VECTORS:
        for line in commands(name):
            print(f"> {line}")
            for event in session.run(line):
                if isinstance(event, ev.Error):
                    print(f"error: {event.message}")
                    return 1
                if isinstance(event, ev.Info):
                    print(event.text)
                if isinstance(event, ev.Table):
                    print(event.title)
                    for row in event.rows:
                        print("  " + "  ".join(f"{c:>10}" for c in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
