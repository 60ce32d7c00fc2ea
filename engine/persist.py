"""Sessions on disk: the edits' tensors in safetensors, everything else as JSON in its metadata.

One file, written atomically: to a temporary file beside the target, flushed to disk,
then renamed over it, so a save killed half-way leaves the previous file intact.
Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kedit.engine.errors import KeditError
from kedit.engine.ledger import Edit
from kedit.engine.patches import LowRankPatch, sidecar
from kedit.engine.probes import ProbeResult, ProbeRow

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
    edits = []
    for edit in session.edits:
        if not isinstance(edit.patch, LowRankPatch):
            raise KeditError(f"edit {edit.id} ({edit.method}) cannot be saved yet")
        tensors[f"{edit.id}.u"] = edit.patch.u.detach().float().cpu().contiguous()
        tensors[f"{edit.id}.v"] = edit.patch.v.detach().float().cpu().contiguous()
        edits.append(edit.record() | {"module": edit.patch.side.name})
    record = {"format": FORMAT, "model": session.handle.name, "model_key": session.handle.cache_key,
              "edits": edits, "chat": [m.as_dict() for m in session.chat],
              "counter": session.ledger._counter}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"kedit": json.dumps(record)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
    from kedit.engine.session import Message

    record, tensors = read_session(path)
    if record["model_key"] != session.handle.cache_key:
        raise KeditError(f"{path} was saved for the model {record['model']!r}, not the loaded one "
                         f"({session.handle.name}); open that model first with /model")
    modules = dict(session.model.named_modules())
    for e in record["edits"]:
        if e["module"] not in modules or f"{e['id']}.u" not in tensors:
            raise KeditError(f"{path} is damaged: edit {e['id']} has no module or tensors")
    with session.lock:
        while session.ledger.edits:
            session.ledger.remove(session.ledger.edits[-1].id)
        loaded = []
        device = next(session.model.parameters()).device
        for e in record["edits"]:
            side = sidecar(session.model, modules[e["module"]], e["module"])
            patch = LowRankPatch(side, e["id"], tensors[f"{e['id']}.u"].to(device),
                                 tensors[f"{e['id']}.v"].to(device))
            patch.apply()
            edit = Edit(e["id"], e["method"], e["prompt"], e["subject"], e["target"], patch, e["layer"],
                        e["subject_how"], e["hparams"], e["info"], _probe(e.get("probe")),
                        e.get("paraphrases", []), e["created"], e["seconds"])
            session.ledger.add(edit)
            loaded.append(edit)
        session.ledger.bump(int(record.get("counter", 0)))
        session.chat[:] = [Message(m["role"], m["content"]) for m in record.get("chat", [])]
    return loaded


def _probe(data: dict[str, Any] | None) -> ProbeResult | None:
    if not data:
        return None
    rows = [ProbeRow(**r) for r in data.get("rows", [])]
    return ProbeResult(data["rel"], data["gen"], data["loc"], data["agree"], data["kl"], rows)
