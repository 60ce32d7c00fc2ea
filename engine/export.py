"""Export an edited model: a plain transformers folder (`/export DIR`, `kedit export DIR`) or, for a
model loaded from a GGUF, a GGUF file (`/export DIR --gguf`, see kedit.engine.gguf_export).

ROME's edits live beside the weights as low-rank factors (y = W x + U Vᵀ x). Export writes
W + U Vᵀ into a copy of the state dict (Wᵀ + V Uᵀ for GPT-2's Conv1D, which stores W as
in × out) and `save_pretrained`s it with the tokenizer, so transformers, and engines that
load its folders such as vLLM, answer with the edits in effect. The live model is not
touched. Racked steering vectors that are on go beside it as llama.cpp GGUF control
vectors, at the strength in use.

With ``gguf=True`` the folder gets ``<source stem>.kedit.gguf`` instead: the GGUF the model
was loaded from, with the deltas merged into the tensors they touch (which the source file
holds, so a bitsandbytes load is fine there) and every other byte copied.

Refused, with the reason: GRACE and WISE edits (a codebook and a routed side memory are
behaviour, not weights), quantized loads into a transformers folder (merging into 4-bit or
8-bit blocks would requantize them), ``--gguf`` for a model not loaded from a GGUF, and a
folder that already holds files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from kedit.engine.errors import KeditError


def merged_weight(module: torch.nn.Module, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The module's weight with U Vᵀ added, computed in float32, in the weight's dtype."""
    from transformers.pytorch_utils import Conv1D

    weight = cast(torch.Tensor, module.weight)  # a Linear's or Conv1D's weight
    delta = u.float() @ v.float().T  # (out, in)
    if isinstance(module, Conv1D):
        delta = delta.T
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def _check(session, out: Path, gguf: bool) -> None:
    """Refuse what cannot be exported, before anything is written."""
    handle = session.handle
    from kedit.engine.methods.table import METHODS, method_named

    other = [e for e in session.edits if not method_named(e.method).exports]
    if other:
        ids = ", ".join(f"{e.id} ({e.method.upper()})" for e in other)
        merging = " or ".join(f"--method {name}" for name, m in METHODS.items() if m.exports)
        raise KeditError(
            f"{ids} cannot be exported: those edits live beside the weights (a codebook or a "
            f"routed side memory), not in them. Roll them back (/rollback ID) or redo them with {merging}"
        )
    if gguf and handle.gguf_path is None:
        raise KeditError(
            f"--gguf writes a copy of the GGUF file the model was loaded from, and {handle.name} "
            "was not loaded from one. Export a transformers folder instead (drop --gguf); "
            "llama.cpp's convert_hf_to_gguf.py turns that folder into a GGUF"
        )
    if handle.quant and not gguf:
        raise KeditError(
            f"this model is loaded {handle.quant}; merging edits would requantize its blocks. "
            "Load it unquantized (--dtype bfloat16), replay the edits, then export"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KeditError(f"{out} already exists and is not an empty folder; choose a new one")


def _write_vectors(session, out: Path) -> list[str]:
    """Racked vectors that are on, as llama.cpp control-vector GGUFs in ``out``."""
    from kedit.engine.vector_io import export_gguf

    rack = session.steering
    return [
        str(export_gguf(rack.in_use(name), out / f"{name}.gguf")[0]) for name, slot in rack.slots.items() if slot.on
    ]


def export_model(
    session,
    out: Path,
    gguf: bool = False,
    gguf_type: str = "q8_0",
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Write the edited model into the new folder ``out``: a transformers checkpoint, or with
    ``gguf`` the source GGUF with the edits merged (edited tensors written as ``gguf_type``:
    q8_0, source, f16 or f32); returns what was written."""
    from kedit.engine.patches import sidecars

    out = Path(out).expanduser()
    _check(session, out, gguf)
    if gguf:
        return _export_gguf(session, out, gguf_type, progress)
    handle = session.handle
    with session.lock:
        state = dict(handle.model.state_dict())
        merged = []
        for name, side in sidecars(handle.model).items():
            if side.stacked is not None:
                state[f"{name}.weight"] = merged_weight(side.module, *side.stacked)
                merged.append(name)
        out.mkdir(parents=True, exist_ok=True)
        handle.model.save_pretrained(out, state_dict=state)
        handle.tokenizer.save_pretrained(out)
        vectors = _write_vectors(session, out)
    return {"folder": str(out), "edits": [e.id for e in session.edits], "merged_modules": merged, "vectors": vectors}


def _export_gguf(
    session, out: Path, gguf_type: str, progress: Callable[[str, int, int], None] | None
) -> dict[str, Any]:
    """``export_model`` for ``--gguf``: <source stem>.kedit.gguf and the vectors in ``out``."""
    from kedit.engine.gguf_export import TENSOR_TYPES, output_path, write_gguf
    from kedit.engine.patches import sidecars

    if gguf_type not in TENSOR_TYPES:
        raise KeditError(f"unknown --gguf-type {gguf_type!r}; use one of {', '.join(TENSOR_TYPES)}")
    start = time.perf_counter()
    source = session.handle.gguf_path
    with session.lock:  # copy the factors out; the file is written without holding the model
        factors = {
            name: (side.stacked[0].detach().float().cpu().numpy(), side.stacked[1].detach().float().cpu().numpy())
            for name, side in sidecars(session.handle.model).items()
            if side.stacked is not None
        }
        records = [
            {
                "id": e.id,
                "method": e.method,
                "prompt": e.prompt,
                "subject": e.subject,
                "target": e.target,
                "layer": e.layer,
                "created": e.created,
            }
            for e in session.edits
        ]
    path = output_path(source, out)
    tensors = write_gguf(source, path, factors, records, gguf_type, progress)
    with session.lock:
        vectors = _write_vectors(session, out)
    return {
        "folder": str(out),
        "file": str(path),
        "source": str(source),
        "edits": [r["id"] for r in records],
        "merged_modules": sorted(factors),
        "tensor_type": gguf_type,
        "tensors": [t.as_dict() for t in tensors],
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - start, 2),
        "vectors": vectors,
    }
