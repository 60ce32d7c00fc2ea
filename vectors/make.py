"""Rebuild the fact-world mood vectors in this folder, and measure them.

    .venv/bin/python vectors/make.py

Writes the training and held-out pairs from the fact world's corpus, then trains,
saves and sweeps each vector with the same /steer commands a user types. The vectors fit one
build of the fact world: the libraries constraints.txt pins, trained with torch's AVX2 kernels
(engine/factworld/build.py). Rerun this, and update README.md's table, when that changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (layers, strength the file recommends, read position). The strengths are chosen from
# the held-out sweep (README.md), not by /steer train's perplexity bound, which is left out of
# the files: the recipe relies on what 0.5 does.
VECTORS = {
    "fact-world-mood": ("5", 0.5, "-1"),
    "fact-world-mood-gentle": ("3-4", 4.0, "-1"),
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
    layers, strength, read = VECTORS[name]
    return [
        f"/steer train {folder / 'mood_train.jsonl'} {name} --layers {layers} --read {read}",
        f"/steer set {name} {strength:g}",
        f"/steer save {name} {folder / (name + '.safetensors')}",
        f"/steer sweep {name} --pairs {folder / 'mood_heldout.jsonl'} --neutral {folder / 'neutral.txt'} "
        f"--strengths 0,0.25,0.5,1,2,3,4",
        f"/steer remove {name}",
    ]


def drop_recommendation(path: Path) -> None:
    """Save the vector at ``path`` again without the perplexity-bound strength /steer train measured,
    so that its own strength (VECTORS) is the only one it names."""
    import dataclasses

    from kedit.engine.steering import SteeringVector

    vector = SteeringVector.load(path)
    dataclasses.replace(vector, recommended=None).save(path)


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
            if line.startswith("/steer save"):
                drop_recommendation(HERE / f"{name}.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
