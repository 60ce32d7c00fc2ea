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
from kedit.engine.paths import atomic_path
from kedit.engine.methods.grace import Entry, GracePatch, Layer, codebook
from kedit.engine.methods.wise import WisePatch, WiseParams, memory
from kedit.engine.patches import LowRankPatch, sidecar
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
    record = {"format": FORMAT, "model": session.handle.name, "model_key": session.handle.cache_key,
              "edits": edits, "chat": [m.as_dict() for m in session.chat],
              "counter": session.ledger._counter}
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
    from kedit.engine.session import Message

    record, tensors = read_session(path)
    if record["model_key"] != session.handle.cache_key:
        raise KeditError(f"{path} was saved for the model {record['model']!r}, not the loaded one "
                         f"({session.handle.name}); open that model first with /model")
    modules = dict(session.model.named_modules())
    for e in record["edits"]:
        if e.get("module") not in modules or not any(k.startswith(f"{e['id']}.") for k in tensors):
            raise KeditError(f"{path} is damaged: edit {e['id']} has no module or tensors")
    with session.lock:
        while session.ledger.edits:
            session.ledger.remove(session.ledger.edits[-1].id)
        device = next(session.model.parameters()).device
        tensors = {k: v.to(device) for k, v in tensors.items()}
        grace_entries: dict[str, list[Any]] = {}
        loaded = []
        for e in record["edits"]:
            patch = _load_patch(session, e, modules[e["module"]], tensors, grace_entries)
            edit = Edit(e["id"], e["method"], e["prompt"], e["subject"], e["target"], patch, e["layer"],
                        e["subject_how"], e["hparams"], e["info"], _probe(e.get("probe")),
                        e.get("paraphrases", []), e["created"], e["seconds"], e.get("question"))
            session.ledger.add(edit)
            loaded.append(edit)
        for name, entries in grace_entries.items():
            codebook(session.model, modules[name], name).restore(entries)
        session.ledger.bump(int(record.get("counter", 0)))
        session.chat[:] = [Message(m["role"], m["content"]) for m in record.get("chat", [])]
    return loaded


def _save_edit(edit: Edit, tensors: dict[str, Any]) -> dict[str, Any]:
    """The edit's JSON record; its tensors go into ``tensors``."""

    def put(key: str, t: torch.Tensor) -> None:
        tensors[key] = t.detach().float().cpu().contiguous()

    p = edit.patch
    rec = edit.record()
    if isinstance(p, LowRankPatch):
        put(f"{edit.id}.u", p.u)
        put(f"{edit.id}.v", p.v)
        return rec | {"module": p.side.name}
    if isinstance(p, GracePatch):
        order = {id(entry): i for i, entry in enumerate(p.book.entries)}
        put(f"grace:{p.book.name}.keys", torch.stack([entry.key for entry in p.book.entries]))
        layers = []
        for j, (entry, layer) in enumerate(p.layers):
            put(f"{edit.id}.value{j}", layer.value)
            layers.append({"entry": order[id(entry)], "radius": layer.radius, "label": list(layer.label)})
        return rec | {"module": p.book.name, "grace": layers, "entries": len(p.book.entries)}
    if isinstance(p, WisePatch):
        put(f"{edit.id}.values", p.values)
        put(f"{edit.id}.inputs", p.edit_inputs)
        return rec | {"module": p.mem.name, "wise": {"bank": p.bank, "shard": p.shard, "score": p.score,
                                                      "shape": list(p.mem.shape), "dtype": str(p.mem.dtype)}}
    raise KeditError(f"edit {edit.id} ({edit.method}) cannot be saved")


def _load_patch(session: Session, e: dict[str, Any], module: Any, tensors: dict[str, Any],
                grace_entries: dict[str, list[Any]]) -> Any:
    """The saved edit's patch, in force (GRACE entries are handed to their codebook at the end)."""
    name = e["module"]
    if "grace" in e:
        entries = grace_entries.setdefault(
            name, [Entry(k) for k in tensors[f"grace:{name}.keys"]])
        book = codebook(session.model, module, name)
        layers = [(entries[g["entry"]], Layer(e["id"], g["radius"], tensors[f"{e['id']}.value{j}"], tuple(g["label"])))
                  for j, g in enumerate(e["grace"])]
        for entry, layer in layers:
            entry.history.append(layer)
        patch = GracePatch(book, e["id"], layers)
        patch.applied = True
        return patch
    if "wise" in e:
        w = e["wise"]
        hp = WiseParams(**{k: v for k, v in e["hparams"].items() if k in WiseParams.__dataclass_fields__})
        mem = memory(session.model, module, name, tuple(w["shape"]), getattr(torch, w["dtype"].split(".")[-1]), hp)
        patch = WisePatch(mem, e["id"], w["bank"], w["shard"], tensors[f"{e['id']}.values"],
                          tensors[f"{e['id']}.inputs"], w["score"])
    else:
        patch = LowRankPatch(sidecar(session.model, module, name), e["id"], tensors[f"{e['id']}.u"],
                             tensors[f"{e['id']}.v"])
    patch.apply()
    return patch


def _probe(data: dict[str, Any] | None) -> ProbeResult | None:
    return ProbeResult.from_dict(data) if data else None
