"""Export an edited model as a plain transformers folder: `/export DIR`, `kedit export DIR`.

ROME's edits live beside the weights as low-rank factors (y = W x + U Vᵀ x). Export writes
W + U Vᵀ into a copy of the state dict (Wᵀ + V Uᵀ for GPT-2's Conv1D, which stores W as
in × out) and `save_pretrained`s it with the tokenizer, so transformers, and engines that
load its folders such as vLLM, answer with the edits in effect. The live model is not
touched. Racked steering vectors that are on go beside it as llama.cpp GGUF control
vectors, at the strength in use.

Refused, with the reason: GRACE and WISE edits (a codebook and a routed side memory are
behaviour, not weights), quantized loads (merging into 4-bit or 8-bit blocks would
requantize them), and a folder that already holds files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kedit.engine.errors import KeditError


def merged_weight(module: torch.nn.Module, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The module's weight with U Vᵀ added, computed in float32, in the weight's dtype."""
    from transformers.pytorch_utils import Conv1D

    weight = module.weight
    delta = u.float() @ v.float().T  # (out, in)
    if isinstance(module, Conv1D):
        delta = delta.T
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def export_model(session, out: Path) -> dict[str, Any]:
    from kedit.engine.patches import sidecars
    from kedit.engine.vector_io import export_gguf

    out = Path(out).expanduser()
    handle = session.handle
    other = [e for e in session.edits if e.method != "rome"]
    if other:
        ids = ", ".join(f"{e.id} ({e.method.upper()})" for e in other)
        raise KeditError(f"{ids} cannot be exported: GRACE and WISE edits are a codebook or a routed side "
                         "memory, not weights. Roll them back (/rollback ID) or redo them with --method rome")
    if handle.quant:
        raise KeditError(f"this model is loaded {handle.quant}; merging edits would requantize its blocks. "
                         "Load it unquantized (--dtype bfloat16), replay the edits, then export")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KeditError(f"{out} already exists and is not an empty folder; choose a new one")
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
        vectors = []
        rack = session.steering
        for name, slot in rack.slots.items():
            if slot.on:
                path, _ = export_gguf(rack.in_use(name), out / f"{name}.gguf")
                vectors.append(str(path))
    return {"folder": str(out), "edits": [e.id for e in session.edits], "merged_modules": merged,
            "vectors": vectors}
