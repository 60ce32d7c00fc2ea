"""GGUF out: the model's source GGUF with its ROME edits merged, for llama.cpp and ollama.

A GGUF holds metadata (architecture, tokenizer, chat template, ...) and tensors, each in its
own encoding (Q4_1, Q8_0, F32, ...). Export reads the source file with ``gguf.GGUFReader``
and writes a new one with ``gguf.GGUFWriter``: every key/value is copied with its own type
and bytes, in order, then ``kedit.edits`` (JSON: what was merged); every tensor the edits do
not touch is copied as its raw bytes in its own type, in order. An edited tensor is decoded,
given W + U Vᵀ in float32 and encoded again in the type asked for.

Why Q8_0 by default: re-encoding an edited tensor in a 4-bit type re-rounds every weight of
it. On SmolLM2-135M's Q4_1 file that adds noise of 2.6-6.8% of ‖W‖ to the tensor and keeps
only 52-91% of a ROME edit along its keys (``MergedTensor.key_error`` 0.09-0.48); Q8_0 keeps
99.5-99.9% of it with 0.5% noise, for 0.4 MB more per edited tensor. ``source`` keeps the
file's own type (Q8_0 where gguf cannot encode it, e.g. the K-quants); ``f16``/``f32`` are
closer still.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kedit.engine.errors import KeditError
from kedit.engine.paths import atomic_path

EDITS_KEY = "kedit.edits"  # metadata key: JSON list of the edits merged into this file
SUFFIX = ".kedit.gguf"  # the export is named <source stem>.kedit.gguf
TENSOR_TYPES = ("q8_0", "source", "f16", "f32")  # how edited tensors are written; the first is the default
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class MergedTensor:
    """One tensor the edits changed, and how faithfully its encoding keeps the edit.

    With W the decoded source tensor, Δ = U Vᵀ the edits and Ŵ the decoded written tensor:
    ``delta_error`` = ‖Ŵ − W − Δ‖ / ‖Δ‖ (all of the matrix), ``key_error`` the same on the
    edits' own input directions (columns of V, where ROME's keys lie: what decides whether the
    edit still fires), ``noise`` = ‖Ŵ − W − Δ‖ / ‖W‖ (what every other input sees)."""

    module: str
    tensor: str
    source_type: str
    written_type: str
    delta_error: float
    key_error: float
    noise: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_path(source: Path, folder: Path) -> Path:
    """Where the export of ``source`` goes in ``folder``: ``<stem>.kedit.gguf``."""
    stem = source.name.removesuffix(".gguf").removesuffix(".kedit")
    return folder / f"{stem}{SUFFIX}"


def _arch(reader: Any) -> tuple[Any, str, int]:
    """The file's gguf.MODEL_ARCH, its name and its block count."""
    from gguf import MODEL_ARCH_NAMES

    field = reader.get_field("general.architecture")
    name = str(field.contents()) if field is not None else ""
    arch = next((a for a, n in MODEL_ARCH_NAMES.items() if n == name), None)
    blocks = reader.get_field(f"{name}.block_count")
    if arch is None or blocks is None:
        raise KeditError(
            f"the source GGUF names architecture {name!r}, which the gguf package cannot map "
            "to tensor names; export a transformers folder instead (/export DIR)"
        )
    return arch, name, int(blocks.contents())


def tensor_name(arch: Any, n_blocks: int, module: str) -> str:
    """The GGUF tensor that holds the weight of HF module ``module`` (e.g. model.layers.5.mlp.down_proj
    -> blk.5.ffn_down.weight)."""
    from gguf import MODEL_TENSOR, get_tensor_name_map

    found = get_tensor_name_map(arch, n_blocks).get_type_and_name(module)
    if found is None:
        raise KeditError(f"no GGUF tensor corresponds to {module}; export a transformers folder instead")
    kind, name = found
    if kind in (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K):
        # transformers permutes llama's Q/K rows on load; a delta in its order would land on the wrong rows
        raise KeditError(
            f"{module} is an attention Q/K projection, whose rows the GGUF stores permuted; "
            "export a transformers folder instead"
        )
    return f"{name}.weight"


def written_type(source: Any, wanted: str) -> Any:
    """The GGML type an edited tensor is written in: ``wanted``, or the source's own type when
    ``wanted`` is "source" and gguf can encode it (else Q8_0)."""
    from gguf import GGMLQuantizationType as T

    if wanted not in TENSOR_TYPES:
        raise KeditError(
            f"unknown GGUF tensor type {wanted!r} for edited tensors; use one of {', '.join(TENSOR_TYPES)}"
        )
    if wanted != "source":
        return T[wanted.upper()]
    encodable = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
    return source if source in encodable else T.Q8_0


def merge(tensor: Any, delta: np.ndarray, v: np.ndarray, qtype: Any, module: str) -> tuple[np.ndarray, MergedTensor]:
    """Decode ``tensor``, add ``delta`` (out, in) and encode it as ``qtype``; with the figures of the loss."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    if weight.shape != delta.shape:
        raise KeditError(
            f"{tensor.name} has shape {weight.shape} in the GGUF but the edit of {module} is "
            f"{delta.shape}; export a transformers folder instead"
        )
    edited = weight + delta
    data = quantize(edited, qtype)
    error = dequantize(data, qtype).astype(np.float32) - edited
    delta_norm = float(np.linalg.norm(delta))
    key_norm = float(np.linalg.norm(delta @ v))
    merged = MergedTensor(
        module=module,
        tensor=tensor.name,
        source_type=T(tensor.tensor_type).name,
        written_type=T(qtype).name,
        delta_error=float(np.linalg.norm(error)) / max(delta_norm, 1e-30),
        key_error=float(np.linalg.norm(error @ v)) / max(key_norm, 1e-30),
        noise=float(np.linalg.norm(error)) / max(float(np.linalg.norm(weight)), 1e-30),
    )
    return data, merged


def _field_value(field: Any) -> tuple[Any, Any, Any]:
    """A metadata field as (value, type, array item type), strings as their raw bytes."""
    from gguf import GGUFValueType as V

    def item(part: np.ndarray, kind: Any) -> Any:
        return part.tobytes() if kind == V.STRING else part[0].item()

    kind = field.types[0]
    if kind != V.ARRAY:
        return item(field.parts[field.data[0]], kind), kind, None
    if len(field.types) != 2:
        raise KeditError(
            f"the source GGUF's key {field.name} is an empty or nested array, which the gguf "
            "writer cannot copy; export a transformers folder instead"
        )
    sub = field.types[1]
    return [item(field.parts[i], sub) for i in field.data], kind, sub


def _earlier_edits(reader: Any) -> list[Any]:
    """Edits an earlier kedit export already merged into the source file."""
    field = reader.get_field(EDITS_KEY)
    if field is None:
        return []
    try:
        return list(json.loads(field.contents()))
    except (ValueError, TypeError):
        return []


def write_gguf(
    source: Path,
    out: Path,
    factors: dict[str, tuple[np.ndarray, np.ndarray]],
    records: Sequence[dict[str, Any]],
    tensor_type: str = TENSOR_TYPES[0],
    progress: Progress | None = None,
) -> list[MergedTensor]:
    """Write ``source`` to ``out`` with U Vᵀ added to each module in ``factors``
    ({HF module name: (U (out, r), V (in, r))}) and ``records`` appended to ``kedit.edits``."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    try:
        reader = GGUFReader(str(source))
    except (OSError, ValueError) as exc:
        raise KeditError(f"cannot read the source GGUF {source}: {exc}") from None
    arch, arch_name, n_blocks = _arch(reader)
    wanted = {tensor_name(arch, n_blocks, module): module for module in factors}
    by_name = {t.name: t for t in reader.tensors}
    if missing := [name for name in wanted if name not in by_name]:
        raise KeditError(
            f"the source GGUF has no tensor {missing[0]} (for {wanted[missing[0]]}); "
            "export a transformers folder instead"
        )
    replaced: dict[str, np.ndarray] = {}
    merged: list[MergedTensor] = []
    for i, (name, module) in enumerate(wanted.items()):
        if progress:
            progress("merging edits into GGUF tensors", i, len(wanted))
        u, v = factors[module]
        tensor = by_name[name]
        replaced[name], info = merge(tensor, u @ v.T, v, written_type(tensor.tensor_type, tensor_type), module)
        merged.append(info)
    with atomic_path(out) as tmp:
        writer = GGUFWriter(tmp, arch_name, endianess=reader.endianess)
        writer.kv_data[0].clear()  # the writer pre-fills general.architecture; copy the source's order instead
        writer.data_alignment = int(reader.alignment)
        for field in reader.fields.values():
            if not field.name.startswith("GGUF.") and field.name != EDITS_KEY:
                writer.add_key_value(field.name, *_field_value(field))
        edits = json.dumps(_earlier_edits(reader) + list(records), default=str)
        writer.add_key_value(EDITS_KEY, edits, GGUFValueType.STRING)
        for t in reader.tensors:
            data = replaced.get(t.name, t.data)
            qtype = written_type(t.tensor_type, tensor_type) if t.name in replaced else t.tensor_type
            writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(reader.tensors):
            if progress and i % 16 == 0:
                progress("writing the GGUF", i, len(reader.tensors))
            writer.write_tensor_data(replaced.get(t.name, t.data), tensor_endianess=reader.endianess)
        writer.close()
    if progress:
        progress("writing the GGUF", len(reader.tensors), len(reader.tensors))
    return merged
