"""/steer: train steering vectors and keep a rack of them, each with its own strength."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kedit.engine import events as ev
from kedit.engine.background import with_progress
from kedit.engine.checks import finite, output_path
from kedit.engine.commands import REGISTRY, Param
from kedit.engine.errors import KeditError
from kedit.engine.steering import (
    MERGE_MODES,
    METHODS,
    NEUTRAL_TEXT,
    WHERE,
    Pair,
    SteeringVector,
    merge_vectors,
    parse_floats,
    parse_layers,
    parse_read,
    read_pairs,
    read_texts,
    recommend_strength,
    sweep,
    train_vector,
)
from kedit.engine.steering.inputs import MAX_STRENGTH
from kedit.engine.vector_io import export_gguf, load_vector, vector_name

if TYPE_CHECKING:
    from kedit.engine.session import Session

ACTIONS = ("train", "add", "set", "on", "off", "remove", "list", "save", "merge", "sweep")
DEFAULT_STRENGTHS = "0,1,2,3,4"
DEFAULT_LIMIT = 1.2  # neutral perplexity / unsteered, when kedit.toml's [steering] says nothing


def _names(session: Session | None, prefix: str) -> list[str]:
    return list(session.steering.slots) if session is not None else []


def _strength(text: str) -> float:
    values = parse_floats(text, "a strength")
    if len(values) != 1:
        raise KeditError(f"a strength is one number, not {text!r}")
    return values[0]


def _need(value: str | None, what: str, usage: str) -> str:
    if value is None:
        raise KeditError(f"say {what}: {usage}")
    return value


def perplexity_limit(session: Session) -> float:
    """[steering] max_perplexity_ratio: how much a recommended strength may raise neutral perplexity."""
    value = session.config.get("steering.max_perplexity_ratio", DEFAULT_LIMIT)
    try:
        limit = float(value)
    except (TypeError, ValueError):
        limit = float("nan")
    if not limit > 1:
        raise KeditError(f"[steering] max_perplexity_ratio in kedit.toml is a ratio above 1, e.g. 1.2, not {value!r}")
    return limit


def calibration_texts(session: Session, path: str | None) -> tuple[list[str], str]:
    """Neutral text for the recommended strength, and where it came from: --neutral, else
    [steering] neutral in kedit.toml, else plain text of the model's own kind (the fact
    world's plain facts on the fact world, whose perplexity on English means nothing;
    kedit's built-in English sentences on any other model)."""
    path = path or session.config.get("steering.neutral") or None
    if path:
        return read_texts(Path(path)), str(path)
    if session.handle.source.kind == "fact-world":
        facts = session.fact_world().facts
        picked = random.Random(0).sample(facts, min(len(NEUTRAL_TEXT) * 2, len(facts)))  # every relation, fixed
        return [f.sentence(0) for f in picked], "the fact world's facts"
    return list(NEUTRAL_TEXT), "built-in"


def sweep_strengths(vector: SteeringVector, text: str | None) -> list[float]:
    """--strengths, else around the recommended strength (0, ½, 1, 2, 4 ×), else 0,1,2,3,4."""
    if text is None and vector.recommended is not None and vector.recommended.strength > 0:
        return [0.0] + [float(f"{k * vector.recommended.strength:.3g}") for k in (0.5, 1, 2, 4)]
    return parse_floats(text or DEFAULT_STRENGTHS, "strengths")


def _with_recommendation(vector: SteeringVector) -> str:
    return f"; {vector.recommended.describe()}" if vector.recommended is not None else ""


def neutral_texts(session: Session, path: str | None) -> list[str]:
    """Text to measure perplexity on: a file's lines, else the model's own unsteered writing."""
    if path:
        return read_texts(Path(path))
    with session.steering.bypassed():
        return session.contexts(16, 24)


@REGISTRY.command(
    "steer",
    "Train steering vectors, stack and merge them with their own strengths, measure them.",
    Param("action", "what to do", choices=ACTIONS),
    Param("file_or_name", "a file, or a vector's name", required=False, metavar="FILE|NAME", complete=_names),
    Param("strength_name_or_path", "a strength, a name or a path", required=False, metavar="ARG", complete=_names),
    Param("more_names", "more vectors to merge", required=False, rest=True, metavar="NAME..."),
    Param("merged_name", "the merged vector's name", required=False, after_arrow=True, metavar="NAME"),
    Param("layers", "only these layers, e.g. 8-14 or 3,5", kind="option", required=False),
    Param("relative", "the strength is a multiple of the layer's mean hidden-state norm", kind="flag"),
    Param(
        "where",
        "steer every position, or only generated tokens",
        kind="option",
        required=False,
        choices=WHERE,
        default="all",
    ),
    Param("method", "training method", kind="option", required=False, choices=METHODS, default="mean_diff"),
    Param(
        "read",
        "where training reads the states: answer (mean over the completion) or a token index",
        kind="option",
        required=False,
        default="answer",
    ),
    Param("mode", "merge mode", kind="option", required=False, choices=MERGE_MODES, default="linear"),
    Param("weights", "merge weights, e.g. 1,0.5", kind="option", required=False),
    Param("density", "share of entries TIES keeps", kind="option", required=False, convert=float, default=1.0),
    Param(
        "positive",
        "train from one pair: the positive completion (FILE is then the prompt)",
        kind="option",
        required=False,
    ),
    Param("negative", "train from one pair: the negative completion", kind="option", required=False),
    Param("pairs", "held-out pairs (JSONL) for /steer sweep", kind="option", required=False),
    Param(
        "neutral",
        "neutral text, one per line, for the perplexity of /steer train and sweep",
        kind="option",
        required=False,
    ),
    Param(
        "strengths",
        "strengths /steer sweep tries (default: around the recommended one, else 0,1,2,3,4)",
        kind="option",
        required=False,
    ),
    details=(
        "/steer train PAIRS.jsonl NAME [--method mean_diff|pca] [--layers 2-4] [--read answer|-1]: "
        "train from JSONL lines {prompt, positive, negative}, find the largest strength that keeps neutral "
        "perplexity within [steering] max_perplexity_ratio (default 1.2×) of the unsteered model's, "
        "and rack it at that\n"
        '/steer train "PROMPT" NAME --positive " happy" --negative " sad": a quick one-pair vector\n'
        "/steer add FILE [STRENGTH] [--layers ..] [--relative] [--where all|generated]: "
        "kedit .safetensors, llama.cpp/repeng .gguf, or an EasyEdit2 layer_L.pt folder; without STRENGTH, "
        "the strength it was saved at (after /steer train, the recommended one)\n"
        "/steer set NAME STRENGTH; /steer on|off|remove NAME; /steer list\n"
        "/steer save NAME PATH: .gguf writes a llama.cpp control vector, anything else safetensors\n"
        "/steer merge A B [C ...] [--weights 1,0.5] [--mode linear|ties|orthogonal] -> NAME: "
        "racks the merge and turns A, B ... off\n"
        "/steer sweep NAME --pairs HELDOUT.jsonl [--neutral TEXT.txt] [--strengths 0,0.1,0.2]: "
        "log-prob margin and perplexity at each strength"
    ),
)
def cmd_steer(
    session: Session,
    action: str,
    file_or_name: str | None,
    strength_name_or_path: str | None,
    more_names: str | None,
    merged_name: str | None,
    layers: str | None,
    relative: bool,
    where: str,
    method: str,
    read: str,
    mode: str,
    weights: str | None,
    density: float,
    positive: str | None,
    negative: str | None,
    pairs: str | None,
    neutral: str | None,
    strengths: str | None,
) -> Iterator[ev.Event]:
    """Read /steer's words and hand them to the action below that does the work."""
    if more_names and action != "merge":
        raise KeditError(f"unexpected {more_names!r}; only /steer merge takes more than two names")
    if action == "list":
        yield from list_vectors(session)
    elif action == "train":
        usage = '/steer train PAIRS.jsonl NAME, or /steer train "PROMPT" NAME --positive P --negative N'
        if (positive is None) != (negative is None):
            raise KeditError("a one-pair vector needs both --positive and --negative")
        if positive is not None and negative is not None:  # both or neither, as checked just above
            train_pairs = [Pair(file_or_name or "", positive, negative)]
        else:
            train_pairs = read_pairs(Path(_need(file_or_name, "the pairs file", usage)))
        name = _need(strength_name_or_path, "a name for the vector", usage)
        yield from train(
            session,
            train_pairs,
            name,
            method=method,
            layers=parse_layers(layers),
            read=parse_read(read),
            neutral=neutral,
            relative=relative,
            where=where,
        )
    elif action == "add":
        path = Path(_need(file_or_name, "the vector file", "/steer add FILE [STRENGTH]"))
        strength = None if strength_name_or_path is None else _strength(strength_name_or_path)
        yield from add(session, path, strength, relative=relative, layers=parse_layers(layers), where=where)
    elif action == "merge":
        usage = "/steer merge A B [C ...] -> NAME"
        names = [
            _need(file_or_name, "the vectors to merge", usage),
            _need(strength_name_or_path, "a second vector", usage),
        ] + (more_names or "").split()
        target = _need(merged_name, "the merged vector's name after ->", usage)
        merge_weights = parse_floats(weights, "merge weights") if weights else None
        yield from merge(session, names, target, weights=merge_weights, mode=mode, density=density)
    else:
        name = _need(file_or_name, "the vector's name", f"/steer {action} NAME")
        if action == "sweep":
            held = _need(pairs, "held-out pairs with --pairs FILE", "/steer sweep NAME --pairs FILE")
            yield from sweep_strength(session, name, read_pairs(Path(held)), strengths=strengths, neutral=neutral)
        elif action == "save":
            yield from save(
                session, name, Path(_need(strength_name_or_path, "where to save it", "/steer save NAME PATH"))
            )
        elif action == "remove":
            yield from remove(session, name)
        elif action == "set":
            value = _strength(_need(strength_name_or_path, "the strength", "/steer set NAME STRENGTH"))
            yield from set_strength(session, name, value)
        else:
            yield from switch(session, name, action == "on")


# -- the actions: what /steer does, and what ``kedit steer`` calls directly ----------------


def list_vectors(session: Session) -> Iterator[ev.Event]:
    """The rack, one row per vector."""
    rack = session.steering
    if not rack.slots:
        yield ev.Info("no steering vectors loaded; /steer add FILE or /steer train PAIRS NAME")
        return
    yield ev.Table(
        f"{len(rack.slots)} steering vector(s)",
        ("name", "state", "strength", "recommended", "layers", "positions", "method"),
        tuple(rack.rows()),
    )


def train(
    session: Session,
    pairs: list[Pair],
    name: str,
    *,
    method: str = "mean_diff",
    layers: list[int] | None = None,
    read: str | int = "answer",
    neutral: str | None = None,
    relative: bool = False,
    where: str = "all",
) -> Iterator[ev.Event]:
    """Train ``name`` from contrastive pairs on the unsteered model, find the strength it
    recommends (neutral perplexity within the configured ratio), and rack it at that."""
    rack = session.steering
    if name in rack.slots:
        raise KeditError(f"a vector named {name!r} is already in the rack; pick another name")
    limit, (texts, source) = perplexity_limit(session), calibration_texts(session, neutral)
    result: list = []

    def work(progress):
        with session.lock, rack.bypassed():  # trained and measured on the model as it is, unsteered
            trained = train_vector(session.handle, pairs, method, layers, read, progress=progress)
            trained.recommended = recommend_strength(session.handle, trained, texts, limit, source, progress)
            trained.strength = trained.recommended.strength
            return trained

    yield from with_progress(work, result)
    vector = result[0]
    strength = 1.0 if relative else vector.strength  # the recommendation is an absolute strength
    with session.lock:
        rack.add(name, vector, strength, relative=relative, where=where)
    count = len(pairs)
    yield ev.Info(
        f"trained {name!r} ({method}, {count} pair{'s' if count != 1 else ''}, layers "
        f"{vector.layers[0]}-{vector.layers[-1]}) and racked it at strength {strength:g}"
        f"{' × norm' if relative else ''}{_with_recommendation(vector)}; "
        f"/steer save {name} PATH keeps it"
    )


def add(
    session: Session,
    path: Path,
    strength: float | None = None,
    *,
    relative: bool = False,
    layers: list[int] | None = None,
    where: str = "all",
) -> Iterator[ev.Event]:
    """Rack a vector file (kedit, llama.cpp/repeng or EasyEdit2), checked against the model, under
    its file's name; without ``strength``, at the strength the file was saved at."""
    vector = load_vector(path)
    vector.check_fits(session.handle)
    strength = vector.strength if strength is None else strength
    name = vector_name(path)
    with session.lock:
        session.steering.add(name, vector, strength, relative=relative, layers=layers, where=where)
    yield ev.Info(
        f"added {name!r} at strength {strength:g}{' × norm' if relative else ''}"
        f"{', generated tokens only' if where == 'generated' else ''}{_with_recommendation(vector)}"
    )


def merge(
    session: Session,
    names: list[str],
    target: str,
    *,
    weights: list[float] | None = None,
    mode: str = "linear",
    density: float = 1.0,
) -> Iterator[ev.Event]:
    """Rack the merge of racked vectors as ``target`` at strength 1 and turn its sources off."""
    rack = session.steering
    if target in rack.slots:
        raise KeditError(f"a vector named {target!r} is already in the rack; pick another name")
    with session.lock:
        finite(density, "--density", 0.0, 1.0)
        for w in weights or ():
            finite(w, "a merge weight", -MAX_STRENGTH, MAX_STRENGTH)
        merged = merge_vectors([rack.vector(n) for n in names], weights, mode, density)
        rack.add(target, merged, 1.0)
        for n in names:
            rack.switch(n, False)
    yield ev.Info(
        f"merged {', '.join(names)} ({mode}) into {target!r} at strength 1; "
        f"{', '.join(names)} are now off so nothing counts twice"
    )


def sweep_strength(
    session: Session,
    name: str,
    held: list[Pair],
    *,
    strengths: str | None = None,
    neutral: str | None = None,
) -> Iterator[ev.Event]:
    """Margin of positive over negative on held-out pairs, and neutral perplexity, per strength."""
    levels = sweep_strengths(session.steering.vector(name), strengths)
    texts = neutral_texts(session, neutral)
    result: list = []

    def work(progress):
        with session.lock:
            return sweep(session.handle, session.steering, name, levels, held, texts, progress)

    yield from with_progress(work, result)
    rows = result[0]
    yield ev.Table(
        f"{name}: margin of positive over negative on {len(held)} pairs; perplexity on {len(texts)} neutral texts",
        ("strength", "margin", "perplexity"),
        tuple((f"{r.strength:g}", f"{r.margin:+.3f}", f"{r.perplexity:.3f}") for r in rows),
    )


def save(session: Session, name: str, path: Path) -> Iterator[ev.Event]:
    """Write a racked vector at its strength in use: .gguf as a llama.cpp control vector,
    anything else as kedit safetensors."""
    path = output_path(path, "where to save the vector")
    with session.lock:
        vector = session.steering.in_use(name)  # the file recommends the strength in use
        if path.suffix == ".gguf":
            path, dropped = export_gguf(vector, path)
            note = " (layer 0 left out: llama.cpp cannot steer it)" if dropped else ""
            yield ev.Info(f"saved {name!r} as a llama.cpp control vector to {path}{note}")
        else:
            yield ev.Info(
                f"saved {name!r} to {vector.save(path)} (added at strength {vector.strength:g} "
                f"when no strength is given{_with_recommendation(vector)})"
            )


def remove(session: Session, name: str) -> Iterator[ev.Event]:
    with session.lock:
        session.steering.remove(name)
    yield ev.Info(f"removed {name!r}")


def set_strength(session: Session, name: str, strength: float) -> Iterator[ev.Event]:
    with session.lock:
        session.steering.set(name, strength)
    yield _slot_state(session, name)


def switch(session: Session, name: str, on: bool) -> Iterator[ev.Event]:
    with session.lock:
        session.steering.switch(name, on)
    yield _slot_state(session, name)


def _slot_state(session: Session, name: str) -> ev.Info:
    slot = session.steering.slots[name]
    return ev.Info(f"{name}: {'on' if slot.on else 'off'}, strength {slot.strength:g}; applies from the next reply")
