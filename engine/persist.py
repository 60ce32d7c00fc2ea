"""Sessions on disk: the edits' tensors in safetensors, everything else as JSON in its metadata.

One file, written atomically: to a temporary file beside the target, flushed to disk,
then renamed over it, so a save killed half-way leaves the previous file intact.
Loading never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kedit.engine.errors import KeditError
from kedit.engine.ledger import Edit
from kedit.engine.messages import Message
from kedit.engine.methods.table import METHODS, method_named
from kedit.engine.paths import atomic_path
from kedit.engine.probes import ProbeResult

if TYPE_CHECKING:
    from kedit.engine.session import Session

FORMAT = "kedit-session/1"


def save_session(session: Session, path: Path) -> Path:
    """Write the session's edits and chat to ``path`` atomically."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    if path.is_dir():
        raise KeditError(f"{path} is a folder; give a file name such as {path / 'session.kedit'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    edits = [_save_edit(edit, tensors) for edit in session.edits]
    record = {
        "format": FORMAT,
        "model": session.handle.name,
        "model_key": session.handle.cache_key,
        "edits": edits,
        "chat": [m.as_dict() for m in session.chat],
        "counter": session.ledger.counter,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"kedit": json.dumps(record)})
    return path


def read_session(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON record and the tensors of a saved session."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise KeditError(f"no saved session at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise KeditError(f"{path} is not a kedit session file ({exc})") from None
    try:
        record = json.loads(meta["kedit"])
    except (KeyError, json.JSONDecodeError):
        raise KeditError(f"{path} is a safetensors file but not a kedit session") from None
    if record.get("format") != FORMAT:
        raise KeditError(f"{path} has format {record.get('format')!r}; this kedit reads {FORMAT}")
    return record, tensors


def load_session(session: Session, path: Path) -> list[Edit]:
    """Replace the session's edits and chat with the saved ones (same model only)."""
    record, tensors = read_session(path)
    if record["model_key"] != session.handle.cache_key:
        raise KeditError(
            f"{path} was saved for the model {record['model']!r}, not the loaded one "
            f"({session.handle.name}); open that model first with /model"
        )
    modules = dict(session.model.named_modules())
    for e in record["edits"]:
        if e.get("method") not in METHODS:
            raise KeditError(
                f"{path} holds a {e.get('method')!r} edit, which this kedit does not know "
                f"(methods: {', '.join(METHODS)})"
            )
        if e.get("module") not in modules or not any(k.startswith(f"{e['id']}.") for k in tensors):
            raise KeditError(f"{path} is damaged: edit {e['id']} has no module or tensors")
    with session.lock:
        while session.ledger.edits:
            session.ledger.remove(session.ledger.edits[-1].id)
        device = next(session.model.parameters()).device
        tensors = {k: v.to(device) for k, v in tensors.items()}
        pending: dict[str, dict[str, Any]] = {name: {} for name in METHODS}
        loaded = []
        for e in record["edits"]:
            method = method_named(e["method"])
            patch = method.restore(session.model, e, modules[e["module"]], tensors, pending[method.name])
            edit = Edit(
                e["id"],
                e["method"],
                e["prompt"],
                e["subject"],
                e["target"],
                patch,
                e["layer"],
                e["subject_how"],
                e["hparams"],
                method.info.from_dict(e["info"]),
                _probe(e.get("probe")),
                e.get("paraphrases", []),
                e["created"],
                e["seconds"],
                e.get("question"),
            )
            session.ledger.add(edit)
            loaded.append(edit)
        for name, method in METHODS.items():
            method.finish_restore(session.model, modules, pending[name])
        session.ledger.bump(int(record.get("counter", 0)))
        session.chat[:] = [Message(m["role"], m["content"]) for m in record.get("chat", [])]
    return loaded


def _save_edit(edit: Edit, tensors: dict[str, Any]) -> dict[str, Any]:
    """The edit's JSON record; its tensors go into ``tensors``."""

    def put(key: str, t: torch.Tensor) -> None:
        tensors[key] = t.detach().float().cpu().contiguous()

    return edit.record() | method_named(edit.method).save(edit, put)


def _probe(data: dict[str, Any] | None) -> ProbeResult | None:
    return ProbeResult.from_dict(data) if data else None
