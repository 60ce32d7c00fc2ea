"""Steering vectors in other tools' files: llama.cpp / repeng GGUF and EasyEdit2 ``layer_L.pt``.

**Layer numbering.** A kedit vector's layer L is the 0-based decoder block whose *output*
gets the direction, as Hugging Face numbers ``model.layers``. llama.cpp's loader
(``common_control_vector_load_one``) puts tensor ``direction.N`` at ``data[(N-1)·n_embd]``,
and ``llama_adapter_cvec::apply`` hands that slice to ``tensors[N]``, which each model's
graph adds after its block ``il = N`` (``build_cvec(cur, il)`` right after the block's last
residual add). So ``direction.N`` steers the output of block N, 0-based: the same number
as ours. llama.cpp rejects ``direction.0``, so block 0's output cannot be steered there;
an export leaves it out and says so. repeng writes the same layout from the same block
numbering, so its files read the same way. EasyEdit2's ``layer_L.pt`` holds the vector for
the output of ``model.layers[L]``: the same number again.

Reading never runs pickled code: GGUF is parsed by the ``gguf`` library, and ``.pt`` files
go through ``torch.load(weights_only=True)``, which refuses anything but tensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from kedit.engine.errors import KeditError
from kedit.engine.paths import atomic_path
from kedit.engine.steering import Recommendation, SteeringVector

ARCH = "controlvector"
_META_KEY = "kedit.vector"  # kedit's own metadata (method, norms, strengths); llama.cpp ignores it
_LAYER_PT = re.compile(r"^layer_(\d+)\.pt$")


def _one_size(directions: dict[int, torch.Tensor], path: Path) -> int:
    """The hidden size every direction shares; a file that mixes sizes is refused."""
    sizes = {d.numel() for d in directions.values()}
    if len(sizes) != 1:
        raise KeditError(f"{path}: directions of different sizes {sorted(sizes)}")
    return sizes.pop()


def export_gguf(vector: SteeringVector, path: Path) -> tuple[Path, list[int]]:
    """Write ``vector`` as a llama.cpp control vector; returns the path and the layers left out."""
    import numpy as np
    from gguf import GGUFWriter

    path = Path(path).expanduser()
    layers = [layer for layer in vector.layers if layer >= 1]
    dropped = [layer for layer in vector.layers if layer < 1]
    if not layers:
        raise KeditError("llama.cpp cannot steer block 0's output, and this vector has no other layer")
    with atomic_path(path) as tmp:
        writer = GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", vector.model_type)
        writer.add_uint32(f"{ARCH}.layer_count", len(layers))
        meta = {
            "method": vector.method,
            "hidden_size": vector.hidden_size,
            "strength": vector.strength,
            "norms": {str(k): v for k, v in vector.norms.items() if k in layers},
            "meta": vector.meta,
        }
        if vector.recommended is not None and not dropped:  # it was measured with every layer in
            meta["recommended"] = vector.recommended.to_json()
        writer.add_string(_META_KEY, json.dumps(meta))
        for layer in layers:
            writer.add_tensor(
                f"direction.{layer}", vector.directions[layer].detach().float().cpu().numpy().astype(np.float32)
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path, dropped


def _field_text(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


def import_gguf(path: Path) -> SteeringVector:
    """A llama.cpp or repeng control vector (``direction.N`` F32 tensors) as a kedit vector."""
    from gguf import GGMLQuantizationType, GGUFReader

    path = Path(path).expanduser()
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise KeditError(f"{path} is not a readable GGUF file ({exc})") from None
    arch = _field_text(reader, "general.architecture")
    if arch is not None and arch != ARCH:
        raise KeditError(f"{path} is a GGUF {arch!r} file, not a control vector")
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", tensor.name)
        if m is None:
            raise KeditError(f"{path}: unexpected tensor {tensor.name!r}; a control vector holds direction.N")
        if int(m.group(1)) == 0:
            raise KeditError(f"{path}: direction.0 is not a valid control-vector layer (llama.cpp numbers from 1)")
        if tensor.tensor_type != GGMLQuantizationType.F32 or len([d for d in tensor.shape if d > 1]) > 1:
            raise KeditError(f"{path}: {tensor.name} must be a 1-D F32 tensor")
        directions[int(m.group(1))] = torch.tensor(tensor.data.reshape(-1).copy(), dtype=torch.float32)
    if not directions:
        raise KeditError(f"{path} holds no direction tensors")
    meta = json.loads(_field_text(reader, _META_KEY) or "{}")
    return SteeringVector(
        directions,
        _field_text(reader, f"{ARCH}.model_hint") or "",
        _one_size(directions, path),
        meta.get("method", "gguf"),
        {int(k): float(v) for k, v in meta.get("norms", {}).items()},
        float(meta.get("strength", 1.0)),
        meta.get("meta", {"source": "gguf"}),
        Recommendation.from_json(meta.get("recommended")),
    )


def import_easyedit2(path: Path) -> SteeringVector:
    """EasyEdit2 vectors: a folder of ``layer_L.pt`` tensors, or one such file."""
    path = Path(path).expanduser()
    files = sorted(p for p in path.iterdir() if _LAYER_PT.match(p.name)) if path.is_dir() else [path]
    if not files or not all(_LAYER_PT.match(p.name) for p in files):
        raise KeditError(f"{path} holds no EasyEdit2 layer_L.pt files")
    directions = {}
    for file in files:
        try:
            value = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses code; any failure means an unusable file
            raise KeditError(f"{file} is not a plain tensor file; kedit loads only tensors ({exc})") from None
        if not isinstance(value, torch.Tensor) or value.squeeze().dim() != 1:
            raise KeditError(f"{file} must hold one 1-D tensor (the layer's direction)")
        layer = _LAYER_PT.match(file.name)
        assert layer is not None  # every file's name was matched above
        directions[int(layer.group(1))] = value.squeeze().float()
    return SteeringVector(directions, "", _one_size(directions, path), "easyedit2", {}, 1.0, {"source": "easyedit2"})


def load_vector(path: Path) -> SteeringVector:
    """Any vector kedit reads, by its file: .safetensors (kedit), .gguf, or EasyEdit2 layer_L.pt."""
    from kedit.engine.checks import user_path

    path = user_path(str(path), "the vector file")
    if not path.exists():
        raise KeditError(f"no steering vector at {path}")
    try:
        if path.is_dir() or _LAYER_PT.match(path.name):
            vector = import_easyedit2(path)
        elif path.suffix == ".gguf":
            vector = import_gguf(path)
        else:
            vector = SteeringVector.load(path)
    except KeditError:
        raise
    except Exception as exc:  # any other way a damaged file fails to read: say so, keep going  # noqa: BLE001
        raise KeditError(f"{path} is not a steering vector kedit can read ({type(exc).__name__}: {exc})") from None
    return vector.check_sound(str(path))


def vector_name(path: Path) -> str:
    """The rack name a file gets: its stem, or the folder's name for EasyEdit2 folders."""
    path = Path(path).expanduser()
    if path.is_dir():
        return path.name if path.name != "caa_vector" else path.parent.name or path.name
    return path.stem
