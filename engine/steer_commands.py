"""/steer: train steering vectors and keep a rack of them, each with its own strength."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kedit.engine import events as ev
from kedit.engine.commands import REGISTRY, Param
from kedit.engine.errors import KeditError
from kedit.engine.steering import METHODS, SteeringVector, parse_layers, read_pairs, train_vector

if TYPE_CHECKING:
    from kedit.engine.session import Session

ACTIONS = ("train", "add", "set", "on", "off", "remove", "list", "save")


def _names(session: Session | None, prefix: str) -> list[str]:
    return list(session.steering.slots) if session is not None else []


def _strength(text: str | None, default: float) -> float:
    if text is None:
        return default
    try:
        return float(text)
    except ValueError:
        raise KeditError(f"a strength is a number, not {text!r}") from None


def _need(value: str | None, what: str, usage: str) -> str:
    if value is None:
        raise KeditError(f"say {what}: {usage}")
    return value


@REGISTRY.command(
    "steer", "Train steering vectors and stack them with their own strengths.",
    Param("action", "what to do", choices=ACTIONS),
    Param("a", "a file, or a vector's name", required=False, metavar="FILE|NAME", complete=_names),
    Param("b", "a strength, a name or a path", required=False, metavar="ARG"),
    Param("layers", "only these layers, e.g. 8-14 or 3,5", kind="option", required=False),
    Param("relative", "the strength is a multiple of the layer's mean hidden-state norm", kind="flag"),
    Param("method", "training method", kind="option", required=False, choices=METHODS, default="mean_diff"),
    details=("/steer train PAIRS.jsonl NAME [--method mean_diff|pca] [--layers 2-4]: train from JSONL "
             "lines {prompt, positive, negative} and rack it at strength 1\n"
             "/steer add FILE [STRENGTH] [--layers ..] [--relative]; /steer set NAME STRENGTH; "
             "/steer on|off|remove NAME; /steer list; /steer save NAME PATH"),
)
def cmd_steer(session: Session, action: str, a: str | None, b: str | None, layers: str | None,
              relative: bool, method: str) -> Iterator[ev.Event]:
    rack = session.steering
    if action == "list":
        if not rack.slots:
            yield ev.Info("no steering vectors loaded; /steer add FILE or /steer train PAIRS NAME")
            return
        yield ev.Table(f"{len(rack.slots)} steering vector(s)", ("name", "state", "strength", "layers", "method"),
                       tuple(rack.rows()))
        return
    if action == "train":
        pairs = read_pairs(Path(_need(a, "the pairs file", "/steer train PAIRS.jsonl NAME")))
        name = _need(b, "a name for the vector", "/steer train PAIRS.jsonl NAME")
        with session.lock:
            vector = train_vector(session.handle, pairs, method, parse_layers(layers))
            rack.add(name, vector, vector.strength, relative=relative)
        yield ev.Info(f"trained {name!r} ({method}, {len(pairs)} pairs, layers "
                      f"{vector.layers[0]}-{vector.layers[-1]}) and racked it at strength {vector.strength:g}; "
                      f"/steer save {name} PATH keeps it")
        return
    if action == "add":
        path = Path(_need(a, "the vector file", "/steer add FILE [STRENGTH]"))
        vector = SteeringVector.load(path)
        vector.check_fits(session.handle)
        strength = _strength(b, vector.strength)
        with session.lock:
            rack.add(path.stem, vector, strength, relative=relative, layers=parse_layers(layers))
        yield ev.Info(f"added {path.stem!r} at strength {strength:g}")
        return
    name = _need(a, "the vector's name", f"/steer {action} NAME")
    with session.lock:
        if action == "remove":
            rack.remove(name)
            yield ev.Info(f"removed {name!r}")
            return
        if action == "save":
            path = rack.vector(name).save(Path(_need(b, "where to save it", "/steer save NAME PATH")))
            yield ev.Info(f"saved {name!r} to {path}")
            return
        if action == "set":
            rack.set(name, _strength(_need(b, "the strength", "/steer set NAME STRENGTH"), 0.0))
        else:
            rack.switch(name, action == "on")
    slot = rack.slots[name]
    yield ev.Info(f"{name}: {'on' if slot.on else 'off'}, strength {slot.strength:g}; applies from the next reply")
