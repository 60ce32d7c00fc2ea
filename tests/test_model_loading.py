"""ModelHandle: names resolve, folders load per family and quantization, failures explain themselves."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import VARIANTS, make_tiny_with_tokenizer, model_type_of, tiny_config

from kedit.engine.arch import SUPPORTED_FAMILIES
from kedit.engine.config import Config
from kedit.engine.errors import KeditError, ModelNotFound, UnsupportedArchitecture
from kedit.engine.model import ModelHandle, resolve

FAMILIES = list(SUPPORTED_FAMILIES)
CASES = FAMILIES + list(VARIANTS)  # Llama 3.x and Phi-4-mini load as llama and phi3 with their own configs


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_with_tokenizer(name, base / name) for name in CASES}


def test_resolve_alias_hub_id_and_folder(tmp_path: Path) -> None:
    cfg = Config.load(env={})
    assert resolve("qwen2.5-7b", cfg).location == "Qwen/Qwen2.5-7B-Instruct"
    assert resolve("Qwen/Qwen2.5-7B-Instruct", cfg).kind == "hub"
    assert resolve(None, cfg).kind == "fact-world"
    assert resolve(str(tmp_path), cfg).kind == "local"
    with pytest.raises(ModelNotFound, match="neither an alias"):
        resolve("qwen9000", cfg)
    with pytest.raises(ModelNotFound, match="No model folder"):
        resolve(str(tmp_path / "missing" / "model"), cfg)


@pytest.mark.parametrize("family", CASES)
def test_load_each_family_from_a_folder(family: str, folders: dict[str, Path]) -> None:
    handle = ModelHandle.load(str(folders[family]), Config.load(env={}), show_progress=False)
    assert handle.adapter.model_type == model_type_of(family)
    assert handle.adapter.family in handle.describe()
    assert handle.adapter.n_layers == tiny_config(family).num_hidden_layers
    # what makes a variant a variant survives save_pretrained and loading: its rope and tying
    want = tiny_config(family)
    assert getattr(handle.model.config, "rope_parameters", None) == getattr(want, "rope_parameters", None)
    assert handle.model.config.tie_word_embeddings == want.tie_word_embeddings
    assert handle.dtype == torch.float32 and handle.device == "cpu"
    assert not handle.is_chat  # a base model: plain completion
    ids = handle.tokenizer("hello", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == handle.tokenizer.bos_token_id
    out = handle.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_load_quantized(family: str, quant: str, folders: dict[str, Path]) -> None:
    import bitsandbytes as bnb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = ModelHandle.load(str(folders[family]), Config.load(env={}), quant=quant, show_progress=False)
        kind = bnb.nn.Linear4bit if quant == "4bit" else bnb.nn.Linear8bitLt
        assert isinstance(handle.adapter.mlp_out(0), kind)
        assert handle.quant == quant
        ids = handle.tokenizer("abc", return_tensors="pt")["input_ids"]
        logits = handle.model(ids).logits
    assert logits.shape[-1] == tiny_config(family).vocab_size
    assert torch.isfinite(logits).all()


def test_bfloat16_dtype(folders: dict[str, Path]) -> None:
    handle = ModelHandle.load(str(folders["llama"]), Config.load(env={}), dtype="bfloat16", show_progress=False)
    assert handle.dtype == torch.bfloat16


def test_unknown_hub_model_explains_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotFound) as info:
        ModelHandle.load("qwen2.5-7b", Config.load(env={}), show_progress=False)
    msg = info.value.message
    for needle in (
        "Qwen/Qwen2.5-7B-Instruct",
        "alias 'qwen2.5-7b'",
        "hf download",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        str(tmp_path / "hf" / "hub"),
        "--model /path/to/folder",
    ):
        assert needle in msg, needle
    assert "\n" not in msg  # one paragraph


def test_unsupported_architecture_lists_the_families(tmp_path: Path) -> None:
    make_tiny_with_tokenizer("opt", tmp_path / "opt")
    with pytest.raises(UnsupportedArchitecture) as info:
        ModelHandle.load(str(tmp_path / "opt"), Config.load(env={}), show_progress=False)
    for family in ("Llama", "Qwen2", "GPT-2", "GPT-NeoX", "Gemma2", "Gemma3", "Phi-3"):
        assert family in info.value.message


def test_a_folder_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="Could not load the model folder"):
        ModelHandle.load(str(tmp_path / "empty"), Config.load(env={}), show_progress=False)


def test_bad_dtype_and_device_are_user_errors(folders: dict[str, Path]) -> None:
    with pytest.raises(KeditError, match="unknown dtype"):
        ModelHandle.load(str(folders["llama"]), Config.load(env={}), dtype="int3", show_progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(KeditError, match="no CUDA GPU"):
            ModelHandle.load(str(folders["llama"]), Config.load(env={}), device="cuda", show_progress=False)
