"""What a GGUF says that transformers' reader, or kedit's cache of its result, would lose.

llama.cpp's converter stores part of a model's position encoding where transformers' GGUF
reader (5.x) does not look: Llama 3's rescaled RoPE as a ``rope_freqs`` tensor, Phi-3/4's
LongRoPE as ``rope_factors_long``/``rope_factors_short`` tensors and its partial rotary width
as ``rope.dimension_count``, linear or YaRN scaling under ``{arch}.rope.scaling.*``, Gemma 3's
local-layer base under ``rope.freq_base_swa``. A model rebuilt without them runs, but its
logits are not the original checkpoint's. ``repair_config`` puts them back into the config
before kedit caches the converted checkpoint; ``pin_tokenizer_class`` keeps the cached
tokenizer the one transformers built from the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

# Llama 3.x's published rescaling; tried when the divisors alone cannot pin the band down.
LLAMA3_DEFAULT_BAND = (1.0, 4.0, 8192)  # low_freq_factor, high_freq_factor, original context
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp's LLM_TYPE_27B for these architectures
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def repair_config(path: Path, config: Any) -> list[str]:
    """Write into ``config`` the RoPE facts the GGUF at ``path`` holds and transformers skipped;
    return one line per repair (for the cache marker)."""
    from transformers.integrations.gguf import read_gguf_metadata

    meta, names = read_gguf_metadata(str(path))  # milliseconds: arrays are left as their lengths
    arch = str(meta["general.architecture"])
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict):
        return []  # a family without RoPE (GPT-2): nothing here applies
    main = rope.get("full_attention", rope)  # Gemma 3 keeps one dict per attention kind
    tensors = _rope_tensors(path, names)
    notes: list[str] = []
    factors = tensors.get("rope_freqs.weight")
    if factors is not None and not np.allclose(factors, 1.0):
        notes.append(_set_rope_divisors(main, factors, config))
    notes += _repair_phi3(meta, tensors, arch, main, config)
    notes += _repair_scaling(meta, arch, rope, main, config)
    return notes + _repair_gemma(meta, arch, config)


def _repair_gemma(meta: dict[str, Any], arch: str, config: Any) -> list[str]:
    """Gemma 2/3: the logit soft-caps the file states, and the 27B models' attention scale, which
    llama.cpp derives from the layer count (1/sqrt(hidden / heads)) and transformers leaves at 256."""
    if arch not in GEMMA_27B_LAYERS:
        return []
    notes = []
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = meta.get(f"{arch}.{key}")
        if value is not None and getattr(config, key, None) != float(value):
            setattr(config, key, float(value))
            notes.append(f"{key} {float(value):g}")
    scalar = config.hidden_size // config.num_attention_heads
    if meta.get(f"{arch}.block_count") == GEMMA_27B_LAYERS[arch] and config.query_pre_attn_scalar != scalar:
        config.query_pre_attn_scalar = scalar
        notes.append(f"query_pre_attn_scalar {scalar} (27B)")
    return notes


def _repair_scaling(
    meta: dict[str, Any], arch: str, rope: dict[str, Any], main: dict[str, Any], config: Any
) -> list[str]:
    """Linear or YaRN scaling from ``rope.scaling.*``, and Gemma 3's local-layer base."""
    notes = []
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind in ("linear", "yarn") and factor and float(factor) != 1.0 and main.get("rope_type") == "default":
        main.update(rope_type=kind, factor=float(factor))
        if kind == "yarn":
            main["original_max_position_embeddings"] = int(
                meta.get(f"{arch}.rope.scaling.original_context_length") or config.max_position_embeddings
            )
        notes.append(f"rope: {kind} scaling, factor {float(factor):g}")
    local_base = meta.get(f"{arch}.rope.freq_base_swa")
    local = rope.get("sliding_attention")
    if local_base is not None and isinstance(local, dict) and local.get("rope_theta") != float(local_base):
        local["rope_theta"] = float(local_base)
        notes.append(f"rope: local layers' base {float(local_base):g}")
    return notes


def _repair_phi3(
    meta: dict[str, Any], tensors: dict[str, np.ndarray], arch: str, rope: dict[str, Any], config: Any
) -> list[str]:
    """Phi-3/4: the rotary share of each head, and LongRoPE's two factor lists."""
    if arch != "phi3":
        return []
    notes = []
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = meta.get(f"{arch}.rope.dimension_count")
    if rotary and int(rotary) < head_dim:
        rope["partial_rotary_factor"] = int(rotary) / head_dim
        notes.append(f"rope: {int(rotary)} of {head_dim} dimensions per head rotate")
    long, short = tensors.get("rope_factors_long.weight"), tensors.get("rope_factors_short.weight")
    if long is not None and short is not None:
        original = int(meta.get(f"{arch}.rope.scaling.original_context_length") or config.max_position_embeddings)
        rope.update(
            rope_type="longrope",
            long_factor=long.tolist(),
            short_factor=short.tolist(),
            original_max_position_embeddings=original,
        )
        attention = meta.get(f"{arch}.rope.scaling.attn_factor")
        if attention is not None:
            rope["attention_factor"] = float(attention)
        config.original_max_position_embeddings = original
        notes.append(f"rope: LongRoPE from {original} positions")
    return notes


def _set_rope_divisors(rope: dict[str, Any], factors: np.ndarray, config: Any) -> str:
    """Express llama.cpp's per-frequency divisors as transformers RoPE parameters: Llama 3's
    rescaling when they follow it, else LongRoPE with one factor list (identical frequencies)."""
    theta = float(rope["rope_theta"])
    found = llama3_parameters(factors, theta)
    if found is not None:
        rope.update(rope_type="llama3", **found)
        return (
            f"rope: llama3 (factor {found['factor']:g}, low {found['low_freq_factor']:g}, "
            f"high {found['high_freq_factor']:g}, original {found['original_max_position_embeddings']})"
        )
    rope.update(
        rope_type="longrope",
        short_factor=factors.tolist(),
        long_factor=factors.tolist(),
        attention_factor=1.0,
        original_max_position_embeddings=int(config.max_position_embeddings),
    )
    return "rope: per-frequency divisors (as LongRoPE with one factor list)"


def llama3_divisors(theta: float, dim: int, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """The per-frequency divisors of Llama 3's RoPE rescaling (Meta's reference; llama.cpp's rope_freqs)."""
    inv = theta ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / inv
    smooth = (original / wavelen - low) / (high - low)
    middle = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, middle))


def llama3_parameters(factors: np.ndarray, theta: float) -> dict[str, Any] | None:
    """Llama 3 rope parameters that reproduce ``factors``, or None when none do.

    The divisors fix the scale factor (their largest value) and, through the frequencies in the
    transition band, low_freq_factor / original and high_freq_factor / original; the original
    context is then taken as Llama 3's 8192. The published band is tried as well, for heads with
    fewer than two band frequencies."""
    factors = np.asarray(factors, dtype=np.float64)
    dim, factor = 2 * len(factors), float(factors.max())
    if factor <= 1.0:
        return None
    published_low, published_high, original = LLAMA3_DEFAULT_BAND
    for low, high in [*_fitted_band(factors, factor, theta, original), (published_low, published_high)]:
        if 0 < low < high and np.allclose(
            llama3_divisors(theta, dim, factor, low, high, original), factors, rtol=1e-4, atol=1e-6
        ):
            return {
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
    return None


def _fitted_band(factors: np.ndarray, factor: float, theta: float, original: int) -> list[tuple[float, float]]:
    """(low_freq_factor, high_freq_factor) fitted to the band frequencies, where the blend
    s = (original / wavelen - low) / (high - low) is linear in 1 / wavelen; none from under two."""
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if band.sum() < 2:
        return []
    dim = 2 * len(factors)
    inv = theta ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    blend = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)  # inverts 1 / ((1 - s) / factor + s)
    slope, intercept = np.polyfit(inv[band] / (2 * math.pi), blend, 1)  # slope = original / (high - low)
    if slope <= 0:
        return []
    low = round(-intercept * original / slope, 6)
    return [(low, round(low + original / slope, 6))]


def pin_tokenizer_class(folder: Path) -> None:
    """Make the saved tokenizer load as written (tokenizer.json as-is), not rebuilt by a model class.

    transformers 5's model-specific tokenizer classes (GemmaTokenizer, ...) set their own
    normalizer and pre-tokenizer when loaded from a folder; for a GGUF whose vocabulary is not
    what that class expects (a byte-level BPE in a Gemma file) the reload would split text
    differently from the tokenizer transformers built from the file."""
    from transformers import TokenizersBackend

    config_file = folder / "tokenizer_config.json"
    settings = json.loads(config_file.read_text())
    settings["tokenizer_class"] = TokenizersBackend.__name__
    config_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False))


def _rope_tensors(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The file's RoPE factor tensors (a few dozen floats each) as float64, read only if present."""
    wanted = [name for name in ROPE_TENSORS if name in names]
    if not wanted:
        return {}
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(path))  # seconds on a large vocabulary, so only for files that need it
    return {
        t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        for t in reader.tensors
        if t.name in wanted
    }
