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

from kedit.engine.checks import input_file, output_path
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

    path = output_path(path, "the session file")
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
    record["sha256"] = _digest(record, tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"kedit": json.dumps(record)})
    return path


def read_session(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON record and the tensors of a saved session."""
    from safetensors import SafetensorError, safe_open

    path = input_file(path, "the saved session")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise KeditError(f"{path} is not a kedit session file ({exc})") from None
    try:
        record = json.loads(meta["kedit"])
    except (KeyError, json.JSONDecodeError, RecursionError):
        raise KeditError(f"{path} is a safetensors file but not a kedit session") from None
    if not isinstance(record, dict):
        raise KeditError(f"{path} is a safetensors file but not a kedit session")
    if record.get("format") != FORMAT:
        raise KeditError(f"{path} has format {record.get('format')!r}; this kedit reads {FORMAT}")
    return record, tensors


RECORD_FIELDS = ("id", "prompt", "subject", "target", "layer", "subject_how", "hparams", "info", "created", "seconds")


def load_session(session: Session, path: Path) -> list[Edit]:
    """Replace the session's edits and chat with the saved ones (same model only).

    A transaction: every record and tensor is checked first (the checksum, known methods,
    modules the methods edit, finite float tensors); then the edits are applied and the
    model is run once. If anything fails, the saved edits come out again and the session's
    own edits and chat go back, exactly as they were."""
    record, tensors = read_session(path)
    _check_record(session, path, record, tensors)
    modules = dict(session.model.named_modules())
    with session.lock:
        old_edits, old_chat = list(session.ledger.edits), list(session.chat)
        for edit in reversed(old_edits):
            session.ledger.remove(edit.id)
        loaded: list[Edit] = []
        try:
            loaded = _apply_record(session, record, tensors, modules)
            _trial_forward(session)
            counter = int(record.get("counter", 0))
        except Exception as exc:  # noqa: BLE001 - put the session back, then say why
            for edit in reversed(loaded):
                session.ledger.remove(edit.id)
            for edit in old_edits:
                edit.patch.apply()
                session.ledger.add(edit)
            session.chat[:] = old_chat
            detail = exc.message if isinstance(exc, KeditError) else f"{type(exc).__name__}: {exc}"
            raise KeditError(f"{path} could not be applied ({detail}); the session is as it was") from None
        session.ledger.bump(counter)
        session.chat[:] = [Message(m["role"], m["content"]) for m in record.get("chat", [])]
    return loaded


def _check_record(session: Session, path: Path, record: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Everything about a saved session that can be checked before it touches the model."""
    if record.get("model_key") != session.handle.cache_key:
        raise KeditError(
            f"{path} was saved for the model {record.get('model')!r}, not the loaded one "
            f"({session.handle.name}); open that model first with /model"
        )
    if record.get("sha256") is not None and record["sha256"] != _digest(record, tensors):
        raise KeditError(f"{path} is damaged: its contents do not match the checksum written when it was saved")
    adapter = session.handle.adapter
    editable = {adapter.mlp_out_name(i) for i in range(adapter.n_layers)}
    edits, chat = record.get("edits"), record.get("chat", [])
    if not isinstance(edits, list) or not all(isinstance(e, dict) for e in edits):
        raise KeditError(f"{path} is damaged: its edits are not a list of records")
    if not isinstance(chat, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in chat
    ):
        raise KeditError(f"{path} is damaged: its chat is not a list of messages")
    for e in edits:
        if e.get("method") not in METHODS:
            raise KeditError(
                f"{path} holds a {e.get('method')!r} edit, which this kedit does not know "
                f"(methods: {', '.join(METHODS)})"
            )
        modules = e.get("modules") or []
        if not isinstance(modules, list):
            raise KeditError(f"{path} is damaged: edit {e.get('id')} has modules that are not a list")
        for name in [e.get("module"), *modules]:
            if name not in editable:
                raise KeditError(f"{path} is damaged: edit {e.get('id')} names {name!r}, not a module kedit edits")
        facts = e.get("facts", [])
        if not isinstance(facts, list) or not all(
            isinstance(f, dict) and all(isinstance(f.get(k), str) for k in ("prompt", "subject", "target"))
            for f in facts
        ):
            raise KeditError(f"{path} is damaged: edit {e.get('id')} has facts that are not fact records")
        missing = [f for f in RECORD_FIELDS if f not in e]
        if missing:
            raise KeditError(f"{path} is damaged: edit {e.get('id')} lacks {', '.join(missing)}")
        mine = [k for k in tensors if k.startswith(f"{e.get('id')}.")]
        if not mine:
            raise KeditError(f"{path} is damaged: edit {e.get('id')} has no tensors")
    for key, t in tensors.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise KeditError(f"{path} is damaged: tensor {key} is not finite floating-point data")


def _apply_record(
    session: Session, record: dict[str, Any], tensors: dict[str, Any], modules: dict[str, torch.nn.Module]
) -> list[Edit]:
    device = next(session.model.parameters()).device
    tensors = {k: v.to(device) for k, v in tensors.items()}
    pending: dict[str, dict[str, Any]] = {name: {} for name in METHODS}
    loaded = []
    for e in record["edits"]:
        method = method_named(e["method"])
        patch = method.restore(session.model, e, modules[e["module"]], tensors, pending[method.name])
        try:
            edit = _edit(e, method, patch)
        except Exception:
            patch.revert()
            raise
        session.ledger.add(edit)
        loaded.append(edit)
    for name, method in METHODS.items():
        method.finish_restore(session.model, modules, pending[name])
    return loaded


def _edit(e: dict[str, Any], method: Any, patch: Any) -> Edit:
    return Edit(
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
        list(e.get("facts") or []),
    )


@torch.no_grad()
def _trial_forward(session: Session) -> None:
    """Run the edited model once: a tensor of the wrong shape fails here, inside the transaction."""
    ids = session.tokenizer("The", return_tensors="pt")["input_ids"].to(next(session.model.parameters()).device)
    if not torch.isfinite(session.model(ids).logits).all():
        raise KeditError("the loaded edits make the model's logits NaN or infinite")


def _digest(record: dict[str, Any], tensors: dict[str, Any]) -> str:
    """SHA-256 of the record (without its checksum) and every tensor's name, shape, dtype and bytes."""
    import hashlib

    h = hashlib.sha256(json.dumps({k: v for k, v in record.items() if k != "sha256"}, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _save_edit(edit: Edit, tensors: dict[str, Any]) -> dict[str, Any]:
    """The edit's JSON record; its tensors go into ``tensors``."""

    def put(key: str, t: torch.Tensor) -> None:
        tensors[key] = t.detach().float().cpu().contiguous()

    return edit.record() | method_named(edit.method).save(edit, put)


def _probe(data: dict[str, Any] | None) -> ProbeResult | None:
    return ProbeResult.from_dict(data) if data else None


def journal_path() -> Path:
    """Where the REPL journals its session (the state dir's journal.kedit)."""
    from kedit.engine.paths import state_dir

    return state_dir() / "journal.kedit"


class Journal:
    """The session written (atomically) after every line that changed its edits or chat, so
    that a crash or a kill loses nothing: ``kedit chat --resume`` loads it back."""

    def __init__(self, session: Session, path: Path | None = None) -> None:
        self.session = session
        self.path = path or journal_path()
        self._seen = self._state()

    def _state(self) -> tuple:
        chat = self.session.chat
        return (
            id(self.session.handle),
            tuple(e.id for e in self.session.ledger),
            len(chat),
            chat[-1] if chat else None,
        )

    def note(self) -> str | None:
        """Write the journal if the session changed; a message if that failed (kedit goes on)."""
        state = self._state()
        if state == self._seen:
            return None
        try:
            save_session(self.session, self.path)
        except (KeditError, OSError) as exc:
            return f"the journal could not be written to {self.path} ({getattr(exc, 'message', exc)})"
        self._seen = state
        return None

    def resume(self) -> str:
        """Load the journal into the session; says what came back."""
        if not self.path.is_file():
            raise KeditError(f"there is no journal to resume at {self.path}")
        edits = load_session(self.session, self.path)
        self._seen = self._state()
        return f"resumed {len(edits)} edit(s) and {len(self.session.chat)} message(s) from {self.path}"
