"""A GGUF of every family transformers' GGUF reader supports loads through kedit as the model it was
written from; files it cannot read, or that are damaged, are clear KeditErrors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_tiny import CHAT_TEMPLATE, GGUF_CASES, bpe_tokenizer, q8_round_trip, source_model, write_gguf
from tiny_models import build_tiny, tiny_config
from torch import nn

from kedit.engine.arch import ArchAdapter
from kedit.engine.config import Config
from kedit.engine.errors import KeditError
from kedit.engine.gguf_files import MARKER
from kedit.engine.gguf_fixups import llama3_divisors, llama3_parameters
from kedit.engine.model import ModelHandle

pytestmark = pytest.mark.filterwarnings("ignore")

# Longer than Gemma 3's tiny window (4) and Phi-4-mini's original context (32 positions): every
# attention kind and both LongRoPE factor lists are exercised. Digits and doubled spaces test the split.
PROBE = "In 1984 it's 12345 km away,  they said: the capital of France is Paris. Watts Humphrey attended"
# The cases whose file carries RoPE facts transformers' reader skips and kedit puts back.
REPAIRED = {
    "llama3": "llama3",
    "phi4-mini": "LongRoPE",
    "qwen3-yarn": "yarn",
    "gemma3-linear": "linear",
    "gemma2": "final_logit_softcapping 20",
}


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Converted checkpoints go to a fresh folder, never the user's cache."""
    monkeypatch.setenv("KEDIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _load(path: Path) -> ModelHandle:
    return ModelHandle.load(str(path), Config.load(env={}), show_progress=False)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _marker(cache: Path) -> dict:
    (marker,) = cache.glob(f"gguf/*/{MARKER}")
    return json.loads(marker.read_text())


@pytest.mark.parametrize("key", list(GGUF_CASES))
def test_gguf_of_each_family_loads_as_its_source(key: str, tokenizer, tmp_path: Path, cache: Path) -> None:
    case = GGUF_CASES[key]
    source = source_model(case, len(tokenizer))
    path = write_gguf(tmp_path / f"{key}.gguf", source, tokenizer, case.arch, name=case.name)
    handle = _load(path)
    assert handle.gguf_path == path.resolve() and handle.model.config.model_type == case.model_type
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 32
    # the cached tokenizer splits text as the source's does, BOS included
    assert torch.equal(handle.tokenizer(PROBE, return_tensors="pt")["input_ids"], ids)
    assert handle.tokenizer.decode(ids[0], skip_special_tokens=True) == PROBE
    # same logits, on the whole probe and on a prefix inside every short window / original context
    torch.testing.assert_close(_logits(handle.model, ids), _logits(source, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(handle.model, ids[:, :12]), _logits(source, ids[:, :12]), rtol=1e-5, atol=1e-5)
    rotary = getattr(getattr(source, "model", None), "rotary_emb", None)
    if rotary is not None:  # the very frequencies, since short prompts barely feel Llama 3's rescaling
        loaded = handle.model.model.rotary_emb
        for name, buffer in rotary.named_buffers():
            torch.testing.assert_close(loaded.get_buffer(name), buffer, msg=name)
    repaired = _marker(cache)["repaired"]
    assert (REPAIRED[key] in " ".join(repaired)) if key in REPAIRED else repaired == []
    # and the adapter finds the same modules, holding the same weights
    want, got = ArchAdapter.for_model(source), handle.adapter
    assert (got.family, got.n_layers, got.hidden_size, got.mlp_hidden_size, got.out_proj_conv1d) == (
        want.family if key != "mistral" else "Llama",
        want.n_layers,
        want.hidden_size,
        want.mlp_hidden_size,
        want.out_proj_conv1d,
    )
    for i in range(got.n_layers):
        assert torch.equal(got.mlp_out(i).weight, want.mlp_out(i).weight)
    assert got.embed_weight_scale() == want.embed_weight_scale()


def test_chat_template_comes_through(tokenizer, tmp_path: Path) -> None:
    case = GGUF_CASES["qwen2"]
    path = write_gguf(
        tmp_path / "chat.gguf", source_model(case, len(tokenizer)), tokenizer, case.arch, chat_template=CHAT_TEMPLATE
    )
    handle = _load(path)
    assert handle.is_chat and "chat model" in handle.describe()
    text = handle.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s>user: hi</s><s>assistant: "


def test_q8_0_gguf_loads_dequantized(tokenizer, tmp_path: Path) -> None:
    """Every matrix stored in Q8_0 reads back as its Q8_0 round trip; norms stay float32."""
    case = GGUF_CASES["llama"]
    source = source_model(case, len(tokenizer))
    handle = _load(write_gguf(tmp_path / "q8.gguf", source, tokenizer, case.arch, q8=True))
    expected = source_model(case, len(tokenizer))
    with torch.no_grad():
        for param in expected.parameters():
            if param.ndim == 2:
                param.copy_(q8_round_trip(param))
    loaded = dict(handle.model.named_parameters())
    for name, param in expected.named_parameters():
        assert torch.equal(loaded[name], param), name
    ids = tokenizer(PROBE, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(_logits(handle.model, ids), _logits(expected, ids))
    drift = (_logits(handle.model, ids) - _logits(source, ids)).abs().max()
    assert 0 < drift < 0.05  # quantization moved the logits, a little


@pytest.mark.parametrize("arch, declared", [("gemma", "gemma"), ("llama", "kedit-unknown")])
def test_architecture_the_reader_lacks_is_a_clear_error(
    arch: str, declared: str, tokenizer, tmp_path: Path, cache: Path
) -> None:
    """Gemma (1) is a family kedit edits but transformers' GGUF reader does not know; an invented
    architecture string is known by nobody. Both name the file, the architecture and a way out."""
    model = build_tiny(arch, seed=1, vocab_size=len(tokenizer))
    path = write_gguf(tmp_path / f"{declared}.gguf", model, tokenizer, arch, declared_arch=declared)
    with pytest.raises(KeditError) as info:
        _load(path)
    message = info.value.message
    for needle in (path.name, f"architecture {declared}", "not supported", "Convert the original checkpoint"):
        assert needle in message, needle
    assert not list(cache.glob(f"gguf/*/{MARKER}"))  # nothing half-converted was cached


def test_qwen3_with_an_unusual_head_size_is_refused(tokenizer, tmp_path: Path) -> None:
    """transformers ignores qwen3.attention.key_length and assumes 128 (true of every released Qwen3)."""
    model = build_tiny("qwen3", seed=1, vocab_size=len(tokenizer))  # head_dim 16
    path = write_gguf(tmp_path / "qwen3-head16.gguf", model, tokenizer, "qwen3")
    with pytest.raises(KeditError, match="transformers cannot read qwen3-head16.gguf"):
        _load(path)


@pytest.mark.parametrize("damage", ["header cut", "tensors cut", "not a gguf", "empty"])
def test_damaged_gguf_is_a_kedit_error(damage: str, tokenizer, tmp_path: Path) -> None:
    case = GGUF_CASES["llama"]
    good = write_gguf(tmp_path / "good.gguf", source_model(case, len(tokenizer)), tokenizer, case.arch)
    data = good.read_bytes()
    broken = {
        "header cut": data[:100],
        "tensors cut": data[: len(data) // 2],
        "not a gguf": b"PK\x03\x04" + bytes(4000),
        "empty": b"",
    }[damage]
    path = tmp_path / "model.gguf"
    path.write_bytes(broken)
    with pytest.raises(KeditError) as info:
        _load(path)
    assert "model.gguf" in info.value.message and "truncated, damaged or not a GGUF" in info.value.message


def test_llama3_band_is_recovered_from_divisors() -> None:
    """Llama 3.1 8B's head (128 wide, theta 500k) has several band frequencies: the band is fitted, and
    a band other than the published one is recovered up to the scale original context leaves free."""
    theta, dim = 500_000.0, 128
    published = llama3_divisors(theta, dim, 8.0, 1.0, 4.0, 8192)
    assert llama3_parameters(published, theta) == {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    other = llama3_divisors(theta, dim, 16.0, 2.0, 8.0, 4096)  # same curve as (4, 16) from 8192
    found = llama3_parameters(other, theta)
    assert found is not None and (found["low_freq_factor"], found["high_freq_factor"]) == pytest.approx((4.0, 16.0))
    np.testing.assert_allclose(
        llama3_divisors(theta, dim, found["factor"], found["low_freq_factor"], found["high_freq_factor"], 8192),
        other,
        rtol=1e-6,
    )
    assert llama3_parameters(np.linspace(1.0, 3.0, dim // 2), theta) is None  # not Llama 3's shape


def test_divisors_not_shaped_like_llama3_still_give_the_same_frequencies() -> None:
    """Any other per-frequency divisors become LongRoPE with one factor list: identical frequencies."""
    from transformers import AutoModelForCausalLM

    from kedit.engine.gguf_fixups import _set_rope_divisors

    config = tiny_config("llama")
    divisors = np.linspace(1.0, 3.0, 8)
    note = _set_rope_divisors(config.rope_parameters, divisors, config)
    assert "LongRoPE" in note
    model = AutoModelForCausalLM.from_config(config)
    plain = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, plain / torch.tensor(divisors, dtype=torch.float32))
    assert model.model.rotary_emb.attention_scaling == 1.0


def test_gemma_27b_attention_scale_follows_llama_cpp() -> None:
    """Gemma 2/3 27B scale attention by 1/sqrt(hidden / heads); the file does not say so, llama.cpp
    infers it from the layer count, and so does kedit (transformers would keep 256)."""
    from kedit.engine.gguf_fixups import _repair_gemma

    config = tiny_config("gemma2", num_hidden_layers=46, query_pre_attn_scalar=256)
    notes = _repair_gemma({"gemma2.block_count": 46, "gemma2.final_logit_softcapping": 30.0}, "gemma2", config)
    assert config.query_pre_attn_scalar == 16 and notes == ["query_pre_attn_scalar 16 (27B)"]
    small = tiny_config("gemma3_text", query_pre_attn_scalar=256)
    assert _repair_gemma({"gemma3.block_count": 26}, "gemma3", small) == [] and small.query_pre_attn_scalar == 256
