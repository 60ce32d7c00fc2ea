"""ArchAdapter finds the right modules in every supported family, plain and bnb-quantized."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig, BertLMHeadModel, BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from kedit.engine.arch import SUPPORTED_FAMILIES, ArchAdapter
from kedit.engine.errors import KeditError, UnsupportedArchitecture
from tiny_models import HIDDEN, INTERMEDIATE, LAYERS, VOCAB, build_tiny, make_tiny, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")
hf_logging.disable_progress_bar()

FAMILIES = list(SUPPORTED_FAMILIES)
IDS = torch.tensor([[5, 17, 42, 99, 3, 64], [120, 7, 7, 31, 88, 11]])

# Expected dotted paths of block 1 and its MLP output projection, read from transformers 5.x.
EXPECTED_NAMES = {
    "llama": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "qwen2": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "qwen3": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "mistral": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "gemma": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "gemma2": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "phi3": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "gpt2": ("transformer.h.1", "transformer.h.1.mlp.c_proj"),
    "gptj": ("transformer.h.1", "transformer.h.1.mlp.fc_out"),
    "gpt_neox": ("gpt_neox.layers.1", "gpt_neox.layers.1.mlp.dense_4h_to_h"),
}


@lru_cache(maxsize=None)
def tiny(model_type: str) -> nn.Module:
    """One shared full-precision tiny model per family (tests remove their hooks)."""
    return build_tiny(model_type)


@contextmanager
def forward_hook(module: nn.Module, hook: Callable) -> Iterator[None]:
    """Attach a forward hook for the duration of a with-block."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run single-threaded: tiny matmuls gain nothing from threads and OpenMP sync dominates them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Save each family's tiny model once per session and hand back its folder."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = make_tiny(model_type, root / model_type)
        return cache[model_type]

    return get


def test_every_family_has_a_tiny_config() -> None:
    assert set(EXPECTED_NAMES) == set(SUPPORTED_FAMILIES)
    for model_type in FAMILIES:
        assert tiny_config(model_type).model_type == model_type


@pytest.mark.parametrize("model_type", FAMILIES)
def test_module_paths(model_type: str) -> None:
    model = tiny(model_type)
    arch = ArchAdapter.for_model(model)
    layer_name, out_name = EXPECTED_NAMES[model_type]
    assert arch.family == SUPPORTED_FAMILIES[model_type]
    assert arch.layer_name(1) == layer_name
    assert arch.mlp_out_name(1) == out_name
    assert model.get_submodule(layer_name) is arch.layer(1) is arch.layers()[1]
    assert model.get_submodule(out_name) is arch.mlp_out(1)
    assert arch.mlp(1) is arch.layer(1).mlp
    assert arch.layer_name(-1) == arch.layer_name(LAYERS - 1)
    with pytest.raises(IndexError):
        arch.layer(LAYERS)
    assert arch.embed() is model.get_input_embeddings()
    assert arch.lm_head() is model.get_output_embeddings()
    assert isinstance(arch.final_norm(), nn.Module)
    assert arch.final_norm().weight.shape == (HIDDEN,)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_dimensions(model_type: str) -> None:
    model = tiny(model_type)
    arch = ArchAdapter.for_model(model)
    assert arch.n_layers == model.config.num_hidden_layers == LAYERS
    assert arch.hidden_size == HIDDEN
    assert arch.mlp_hidden_size == INTERMEDIATE
    assert arch.out_proj_conv1d == (model_type == "gpt2")
    for i in range(arch.n_layers):
        weight = arch.mlp_out(i).weight
        expected = (INTERMEDIATE, HIDDEN) if arch.out_proj_conv1d else (HIDDEN, INTERMEDIATE)
        assert tuple(weight.shape) == expected
        assert isinstance(arch.mlp_out(i), Conv1D if arch.out_proj_conv1d else nn.Linear)
    ins = arch.mlp_in(0)
    assert len(ins) == (2 if model_type not in ("phi3", "gpt2", "gptj", "gpt_neox") else 1)
    widths = [m.weight.shape[0] if isinstance(m, Conv1D) else m.in_features for m in ins]
    assert widths == [HIDDEN] * len(ins)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_mlp_out_hook_widths(model_type: str) -> None:
    model = tiny(model_type)
    arch = ArchAdapter.for_model(model)
    seen: dict[int, tuple[int, int]] = {}
    for i in range(arch.n_layers):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor, i: int = i) -> None:
            seen[i] = (args[0].shape[-1], output.shape[-1])

        with forward_hook(arch.mlp_out(i), hook), torch.no_grad():
            model(IDS)
    assert seen == {i: (arch.mlp_hidden_size, arch.hidden_size) for i in range(arch.n_layers)}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_residual_matches_hidden_states(model_type: str) -> None:
    model = tiny(model_type)
    arch = ArchAdapter.for_model(model)
    captured: dict[int, torch.Tensor] = {}
    handles = [
        arch.layer(i).register_forward_hook(
            lambda module, args, output, i=i: captured.__setitem__(i, arch.residual(output))
        )
        for i in range(arch.n_layers)
    ]
    try:
        with torch.no_grad():
            out = model(IDS, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    assert len(out.hidden_states) == arch.n_layers + 1
    for i in range(arch.n_layers - 1):
        assert captured[i].shape == (*IDS.shape, HIDDEN)
        assert torch.equal(captured[i], out.hidden_states[i + 1])
    # The last hidden state is reported after the final norm; lm_head (and any softcap) gives the logits.
    with torch.no_grad():
        normed = arch.final_norm()(captured[arch.n_layers - 1])
        logits = arch.lm_head()(normed)
    cap = arch.logit_softcap()
    assert cap == (30.0 if model_type == "gemma2" else None)
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    torch.testing.assert_close(normed, out.hidden_states[-1])
    torch.testing.assert_close(logits, out.logits)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_replace_residual(model_type: str) -> None:
    model = tiny(model_type)
    arch = ArchAdapter.for_model(model)
    with torch.no_grad():
        base = model(IDS).logits
    outputs: list[object] = []

    def same(module: nn.Module, args: tuple, output: object) -> object:
        outputs.append(output)
        return arch.replace_residual(output, arch.residual(output) + 0)

    def shifted(module: nn.Module, args: tuple, output: object) -> object:
        return arch.replace_residual(output, arch.residual(output) + 1.0)

    with forward_hook(arch.layer(1), same), torch.no_grad():
        assert torch.equal(model(IDS).logits, base)
    with forward_hook(arch.layer(1), shifted), torch.no_grad():
        assert not torch.allclose(model(IDS).logits, base)
    # transformers 5.x blocks return a bare tensor, except GPT-J's (hidden, attn_weights) tuple.
    assert isinstance(outputs[0], tuple) == (model_type == "gptj")
    replaced = arch.replace_residual(outputs[0], torch.zeros(1))
    assert type(replaced) is type(outputs[0])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_embedding_scale(model_type: str) -> None:
    model = tiny(model_type)
    arch = ArchAdapter.for_model(model)
    scaled = model_type in ("gemma", "gemma2")
    # transformers 5.x Gemma multiplies inside its embedding module, so nothing is left for the caller.
    assert arch.embed_scale() == 1.0
    assert arch.embed_weight_scale() == (math.sqrt(HIDDEN) if scaled else 1.0)
    with torch.no_grad():
        first = model(IDS, output_hidden_states=True).hidden_states[0]
        embedded = arch.embed_scale() * arch.embed()(IDS)
        rows = arch.embed_weight_scale() * arch.embed().weight[IDS]
        if model_type == "gpt2":  # GPT-2 adds learned position embeddings before block 0
            positions = model.transformer.wpe(torch.arange(IDS.shape[1]))
            embedded, rows = embedded + positions, rows + positions
    torch.testing.assert_close(embedded, first, rtol=0, atol=0)
    torch.testing.assert_close(rows, first)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_quantized(model_type: str, bits: int, saved: Callable[[str], Path]) -> None:
    """bnb replaces every Linear, and GPT-2's Conv1D too: it is transposed into a (out, in) bnb Linear."""
    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        layer_type: type[nn.Module] = bnb.nn.Linear4bit
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
        layer_type = bnb.nn.Linear8bitLt
    model = AutoModelForCausalLM.from_pretrained(saved(model_type), quantization_config=config, device_map="cpu")
    arch = ArchAdapter.for_model(model)
    assert arch.n_layers == LAYERS and arch.hidden_size == HIDDEN
    assert arch.mlp_hidden_size == INTERMEDIATE
    assert arch.out_proj_conv1d is False  # even for GPT-2: the bnb layer has a Linear layout
    for i in range(arch.n_layers):
        assert isinstance(arch.mlp_out(i), layer_type)
        assert model.get_submodule(arch.mlp_out_name(i)) is arch.mlp_out(i)
    assert all(isinstance(m, layer_type) for m in arch.mlp_in(0))
    # The quantized projection computes what the full-precision one does, up to quantization noise.
    x = torch.randn(8, INTERMEDIATE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny(model_type).get_submodule(arch.mlp_out_name(0))(x)
        got = arch.mlp_out(0)(x).float()
    assert got.shape == want.shape == (8, HIDDEN)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95
    with torch.no_grad():
        generated = model.generate(IDS[:1], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, IDS.shape[1] + 3)
    assert int(generated.max()) < VOCAB


def test_unsupported_causal_lm_names_the_families() -> None:
    model = build_tiny("opt")
    with pytest.raises(UnsupportedArchitecture) as info:
        ArchAdapter.for_model(model)
    message = info.value.message
    assert "'opt'" in message
    for model_type, family in SUPPORTED_FAMILIES.items():
        assert family in message and model_type in message
    assert isinstance(info.value, KeditError)


def test_unsupported_non_causal_and_bare_modules() -> None:
    bert = BertLMHeadModel(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=INTERMEDIATE, is_decoder=True))
    with pytest.raises(UnsupportedArchitecture, match="'bert'.*Llama"):
        ArchAdapter.for_model(bert)
    with pytest.raises(UnsupportedArchitecture, match="None.*GPT-NeoX"):
        ArchAdapter.for_model(nn.Linear(2, 2))


def test_base_model_without_lm_head_is_refused() -> None:
    base = tiny("llama").model  # a LlamaModel: right model_type, wrong shape
    with pytest.raises(UnsupportedArchitecture, match="AutoModelForCausalLM"):
        ArchAdapter.for_model(base)
