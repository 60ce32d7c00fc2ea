"""ArchAdapter finds the right modules in every supported family (and in model lines with their own
config: Llama 3.x, Phi-4-mini), plain and bnb-quantized, and edits hooked there revert exactly."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from tiny_models import (
    GEMMA3_LAYER_TYPES,
    HEAD_DIM,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    LLAMA3_ROPE,
    PHI4_ROTARY_FRACTION,
    POSITIONS,
    SLIDING_WINDOW,
    VARIANTS,
    VOCAB,
    build_tiny,
    make_tiny,
    model_type_of,
    tiny_config,
)
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig, BertLMHeadModel, BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from kedit.engine.arch import SUPPORTED_FAMILIES, ArchAdapter
from kedit.engine.errors import KeditError, UnsupportedArchitecture
from kedit.engine.methods.grace.codebook import Entry, GracePatch, Revision
from kedit.engine.patches import LowRankPatch

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")
hf_logging.disable_progress_bar()

FAMILIES = list(SUPPORTED_FAMILIES)
CASES = FAMILIES + list(VARIANTS)  # every family, plus model lines that differ only in their config
IDS = torch.tensor([[5, 17, 42, 99, 3, 64], [120, 7, 7, 31, 88, 11]])

# Expected dotted paths of block 1 and its MLP output projection, read from transformers 5.x.
EXPECTED_NAMES = {
    "llama": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "qwen2": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "qwen3": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "mistral": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "gemma": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "gemma2": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "gemma3_text": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "phi3": ("model.layers.1", "model.layers.1.mlp.down_proj"),
    "gpt2": ("transformer.h.1", "transformer.h.1.mlp.c_proj"),
    "gptj": ("transformer.h.1", "transformer.h.1.mlp.fc_out"),
    "gpt_neox": ("gpt_neox.layers.1", "gpt_neox.layers.1.mlp.dense_4h_to_h"),
}


@cache
def tiny(name: str) -> nn.Module:
    """One shared full-precision tiny model per family or variant (tests remove their hooks)."""
    return build_tiny(name)


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
    for name in CASES:
        assert tiny_config(name).model_type == model_type_of(name)
    assert set(VARIANTS.values()) <= set(SUPPORTED_FAMILIES)


@pytest.mark.parametrize("name", CASES)
def test_module_paths(name: str) -> None:
    model = tiny(name)
    model_type = model_type_of(name)
    arch = ArchAdapter.for_model(model)
    assert arch.model_type == model_type
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


@pytest.mark.parametrize("name", CASES)
def test_dimensions(name: str) -> None:
    model = tiny(name)
    model_type = model_type_of(name)
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


@pytest.mark.parametrize("name", CASES)
def test_mlp_out_hook_widths(name: str) -> None:
    model = tiny(name)
    arch = ArchAdapter.for_model(model)
    seen: dict[int, tuple[int, int]] = {}
    for i in range(arch.n_layers):

        def hook(module: nn.Module, args: tuple, output: torch.Tensor, i: int = i) -> None:
            seen[i] = (args[0].shape[-1], output.shape[-1])

        with forward_hook(arch.mlp_out(i), hook), torch.no_grad():
            model(IDS)
    assert seen == {i: (arch.mlp_hidden_size, arch.hidden_size) for i in range(arch.n_layers)}


@pytest.mark.parametrize("name", CASES)
def test_residual_matches_hidden_states(name: str) -> None:
    model = tiny(name)
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
    assert cap == (30.0 if model_type_of(name) == "gemma2" else None)
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    torch.testing.assert_close(normed, out.hidden_states[-1])
    torch.testing.assert_close(logits, out.logits)


@pytest.mark.parametrize("name", CASES)
def test_replace_residual(name: str) -> None:
    model = tiny(name)
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
    # transformers 5.24 blocks all return a bare tensor (GPT-J's returned a tuple in earlier 5.x).
    assert isinstance(outputs[0], torch.Tensor)
    zero = torch.zeros(1)
    for output in (outputs[0], (outputs[0], None), [outputs[0], None]):
        replaced = arch.replace_residual(output, zero)
        assert type(replaced) is type(output)
        assert arch.residual(replaced) is zero


@pytest.mark.parametrize("name", CASES)
def test_embedding_scale(name: str) -> None:
    model = tiny(name)
    model_type = model_type_of(name)
    arch = ArchAdapter.for_model(model)
    scaled = model_type in ("gemma", "gemma2", "gemma3_text")
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


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _mlp_out_input(model: nn.Module, arch: ArchAdapter, i: int) -> torch.Tensor:
    """What block i's MLP output projection reads on IDS: (batch, seq, mlp_hidden_size)."""
    seen: list[torch.Tensor] = []
    with forward_hook(arch.mlp_out(i), lambda m, args, out: seen.append(args[0].detach().clone())):
        _logits(model)
    return seen[0]


@pytest.mark.parametrize("name", CASES)
def test_rank_one_edit_at_mlp_out_reverts_bit_for_bit(name: str) -> None:
    """A ROME-style rank-one delta (W + u vᵀ) beside the MLP output projection moves the logits
    everywhere the key direction is read, and reverting it restores them exactly."""
    from kedit.engine.patches import LowRankSidecar

    model = tiny(name)
    arch = ArchAdapter.for_model(model)
    module = arch.mlp_out(1)
    base = _logits(model)
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(arch.hidden_size, 1, generator=gen)  # value direction, residual width
    v = torch.randn(arch.mlp_hidden_size, 1, generator=gen)  # key direction, MLP width
    patch = LowRankPatch(LowRankSidecar(module, arch.mlp_out_name(1)), "e1", u, v)
    patch.apply()
    try:
        edited = _logits(model)
    finally:
        patch.revert()
    assert (edited - base).abs().amax() > 1e-3
    assert torch.equal(_logits(model), base)
    assert not module._forward_hooks


@pytest.mark.parametrize("name", CASES)
def test_codebook_edit_at_mlp_out_changes_only_its_key(name: str) -> None:
    """A GRACE-style codebook entry on the MLP output replaces the output only where its key is read:
    earlier positions and the other sequence keep their logits bit for bit; reverting restores all."""
    from kedit.engine.methods.grace.codebook import GraceCodebook

    model = tiny(name)
    arch = ArchAdapter.for_model(model)
    module = arch.mlp_out(1)
    base = _logits(model)
    key = _mlp_out_input(model, arch, 1)[0, 3].float()
    book = GraceCodebook(module, arch.mlp_out_name(1))
    value = torch.full((arch.hidden_size,), 3.0)
    patch = GracePatch(book, "g1", [(Entry(key=key), Revision("g1", 1e-3 * float(key.norm()), value, (0,)))])
    patch.apply()
    try:
        edited = _logits(model)
    finally:
        patch.revert()
    assert book.replaced == 1  # one position of one sequence came from the codebook
    assert torch.equal(edited[1], base[1])
    assert torch.equal(edited[0, :3], base[0, :3])
    assert (edited[0, 3:] - base[0, 3:]).abs().amax() > 1e-3
    assert torch.equal(_logits(model), base)
    assert not module._forward_hooks


def test_gemma3_local_and_global_layers() -> None:
    """Gemma 3: windowed and global attention layers in the configured pattern, four norms per block
    plus q/k norms, and a sliding window that really limits what a position sees."""
    model = tiny("gemma3_text")
    arch = ArchAdapter.for_model(model)
    assert arch.family == "Gemma3" and arch.logit_softcap() is None
    assert model.config.layer_types == [arch.layer(i).self_attn.layer_type for i in range(LAYERS)] == GEMMA3_LAYER_TYPES
    assert [arch.layer(i).self_attn.sliding_window for i in range(LAYERS)] == [SLIDING_WINDOW, None, SLIDING_WINDOW]
    for norm in (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ):
        assert arch.layer(0).get_submodule(norm).weight.shape == (HIDDEN,)
    assert arch.layer(0).self_attn.q_norm.weight.shape == (HEAD_DIM,)
    # The same weights with a window as long as the context: positions inside the window agree, later ones not.
    wide = build_tiny("gemma3_text", sliding_window=POSITIONS)
    assert torch.equal(wide.model.layers[0].mlp.down_proj.weight, arch.mlp_out(0).weight)
    base, unwindowed = _logits(model), _logits(wide)
    torch.testing.assert_close(base[:, :SLIDING_WINDOW], unwindowed[:, :SLIDING_WINDOW])
    assert (base[:, SLIDING_WINDOW:] - unwindowed[:, SLIDING_WINDOW:]).abs().amax() > 1e-4


def _llama3_inv_freq(head_dim: int, rope: dict[str, float]) -> torch.Tensor:
    """Llama 3.1's rescaled RoPE frequencies, written out from the paper's recipe (Meta's reference)."""
    inv = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    old = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / rope["low_freq_factor"], old / rope["high_freq_factor"]
    out = []
    for f in inv.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / rope["factor"])
        else:
            smooth = (old / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            out.append((1 - smooth) * f / rope["factor"] + smooth * f)
    return torch.tensor(out, dtype=torch.float32)


def test_llama3_rope_scaling_is_in_force() -> None:
    """Llama 3.x loads as the llama family with its rescaled RoPE (not the plain one) and tied lm_head."""
    model = tiny("llama3")
    arch = ArchAdapter.for_model(model)
    assert arch.family == "Llama"
    inv_freq = model.model.rotary_emb.inv_freq
    want = _llama3_inv_freq(HEAD_DIM, LLAMA3_ROPE)
    torch.testing.assert_close(inv_freq, want)
    plain = 1.0 / LLAMA3_ROPE["rope_theta"] ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    ratio = (plain / inv_freq).tolist()  # fast frequencies kept, slow ones divided by 8, one blended
    assert ratio[:4] == pytest.approx([1.0] * 4) and ratio[5:] == pytest.approx([8.0] * 3)
    assert 1.5 < ratio[4] < 7.5
    assert arch.lm_head().weight is arch.embed().weight
    assert not torch.allclose(
        _logits(model),
        _logits(
            build_tiny("llama3", rope_parameters={"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]})
        ),
    )


def test_phi4_mini_partial_rotary_and_longrope() -> None:
    """Phi-4-mini is a phi3 model rotating 3/4 of each head with LongRoPE; the adapter sees Phi-3."""
    model = tiny("phi4-mini")
    arch = ArchAdapter.for_model(model)
    assert arch.family == "Phi-3" and arch.mlp_in(0)[0].out_features == 2 * INTERMEDIATE  # fused gate+up
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.shape == (int(HEAD_DIM * PHI4_ROTARY_FRACTION) // 2,)
    factor = POSITIONS / (POSITIONS // 2)
    assert rotary.attention_scaling == pytest.approx(math.sqrt(1 + math.log(factor) / math.log(POSITIONS // 2)))
    assert arch.lm_head().weight is arch.embed().weight


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
    bert = BertLMHeadModel(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=INTERMEDIATE,
            is_decoder=True,
        )
    )
    with pytest.raises(UnsupportedArchitecture, match="'bert'.*Llama"):
        ArchAdapter.for_model(bert)
    with pytest.raises(UnsupportedArchitecture, match="None.*GPT-NeoX"):
        ArchAdapter.for_model(nn.Linear(2, 2))


def test_base_model_without_lm_head_is_refused() -> None:
    base = tiny("llama").model  # a LlamaModel: right model_type, wrong shape
    with pytest.raises(UnsupportedArchitecture, match="AutoModelForCausalLM"):
        ArchAdapter.for_model(base)
