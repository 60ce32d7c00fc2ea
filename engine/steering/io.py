"""kedit's own steering-vector file: safetensors, one tensor per layer, JSON metadata.

Other tools' files (llama.cpp / repeng GGUF, EasyEdit2 ``layer_L.pt``) are read and written
by ``kedit.engine.vector_io``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kedit.engine.errors import KeditError

if TYPE_CHECKING:  # SteeringVector.save and .load call this module: no import back at run time
    from kedit.engine.steering.vector import SteeringVector

FORMAT = "kedit-steering/1"


def save_safetensors(vector: SteeringVector, path: Path) -> Path:
    """One tensor per layer (``layer.L``) and JSON metadata, written atomically."""
    from safetensors.torch import save_file

    from kedit.engine.paths import atomic_path

    path = Path(path).expanduser()
    meta = {
        "format": FORMAT,
        "model_type": vector.model_type,
        "hidden_size": vector.hidden_size,
        "method": vector.method,
        "layers": vector.layers,
        "norms": {str(k): v for k, v in vector.norms.items()},
        "strength": vector.strength,
        "meta": vector.meta,
    }
    if vector.recommended is not None:
        meta["recommended"] = vector.recommended.to_json()
    with atomic_path(path) as tmp:
        save_file(
            {f"layer.{layer}": d.detach().float().cpu().contiguous() for layer, d in vector.directions.items()},
            tmp,
            metadata={"kedit": json.dumps(meta)},
        )
    return path


def load_safetensors(path: Path) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """The directions by layer and the metadata of a file written by ``save_safetensors``;
    anything else is refused, saying why (``SteeringVector.load`` builds the vector)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise KeditError(f"no steering vector at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["kedit"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise KeditError(f"{path} is not a kedit steering vector ({exc})") from None
    if meta.get("format") != FORMAT:
        raise KeditError(f"{path} has format {meta.get('format')!r}; this kedit reads {FORMAT}")
    directions = {int(k.split(".", 1)[1]): v.float() for k, v in tensors.items() if k.startswith("layer.")}
    return directions, meta
