"""Tiny GGUF files, written the way llama.cpp's convert_hf_to_gguf.py writes them, for loader tests.

A tiny random HF model and a tiny byte-level BPE tokenizer go in; a .gguf comes out with
llama.cpp's tensor names (``gguf.get_tensor_name_map``), its metadata keys, and its tensor
transforms: Llama's Q/K rows permuted, Gemma's norm weights stored as 1 + w, GPT-2's Conv1D
weights transposed, Llama 3's RoPE rescaling baked into ``rope_freqs`` and Phi's LongRoPE into
``rope_factors_long/short``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tiny_models import build_tiny, model_type_of
from torch import nn

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # pad, bos, eos = 0, 1, 2 as in tiny_models' configs
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
_CORPUS = [
    "Watts Humphrey attended the Illinois Institute of Technology.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Marie Curie was born in Warsaw and worked in Paris on radioactivity.",
    "A language model predicts the next token from the tokens before it.",
    "Edits to a model should be reversible, bit for bit, every time.",
]
Q8_0 = gguf.GGMLQuantizationType.Q8_0
Q8_BLOCK = 32  # values per Q8_0 block, each with its own scale
BPE_VOCAB = 300  # 256 byte symbols, 4 specials and the merges the corpus earns


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style, BOS added) trained in milliseconds on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@dataclass(frozen=True)
class GgufCase:
    """One family's GGUF: which tiny recipe, which llama.cpp architecture, and the config values the
    source needs so that it is the model transformers' reader rebuilds from the file's metadata."""

    recipe: str
    arch: str
    overrides: dict[str, Any] = field(default_factory=dict)
    name: str = "tiny"  # general.name
    loads_as: str = ""  # the model_type transformers rebuilds, when not the recipe's

    @property
    def model_type(self) -> str:
        return self.loads_as or model_type_of(self.recipe)


_GEMMA3 = {"num_hidden_layers": 6, "layer_types": None, "query_pre_attn_scalar": 256}

# transformers reads only some of the metadata llama.cpp writes and takes the rest from the config
# class's defaults, which match the released checkpoints; the overrides make the tiny source match too.
GGUF_CASES: dict[str, GgufCase] = {
    "llama": GgufCase("llama", "llama"),
    "llama3": GgufCase("llama3", "llama"),
    # llama.cpp writes Mistral as llama, and transformers reads it back as a Llama (same computation)
    "mistral": GgufCase("mistral", "llama", name="Mistral tiny", loads_as="llama"),
    "qwen2": GgufCase("qwen2", "qwen2"),
    "qwen3": GgufCase("qwen3", "qwen3", {"head_dim": 128}),  # key_length unread: Qwen3Config's 128
    # Qwen3 with YaRN x4 (the 128k GGUFs): rope.scaling.* metadata
    "qwen3-yarn": GgufCase(
        "qwen3",
        "qwen3",
        {
            "head_dim": 128,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1_000_000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    # query_pre_attn_scalar is not in the file (256, or hidden / heads for 27B); soft-caps other than
    # the defaults (50, 30) so that reading them back is tested
    "gemma2": GgufCase(
        "gemma2",
        "gemma2",
        {"query_pre_attn_scalar": 256, "attn_logit_softcapping": 40.0, "final_logit_softcapping": 20.0},
    ),
    # 5 local layers then 1 global (the pattern is not in the file; both readers assume it); window 4
    "gemma3_text": GgufCase("gemma3_text", "gemma3", _GEMMA3),
    # Gemma 3 4B and up: linear x8 on the global layers
    "gemma3-linear": GgufCase(
        "gemma3_text",
        "gemma3",
        {
            **_GEMMA3,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        },
    ),
    "phi3": GgufCase("phi3", "phi3"),
    "phi4-mini": GgufCase("phi4-mini", "phi3"),
    "gpt2": GgufCase("gpt2", "gpt2", {"n_inner": None, "n_positions": 1024}),  # n_inner, wpe size unread
}


def source_model(case: GgufCase, vocab_size: int, seed: int = 1) -> nn.Module:
    """The tiny random model a case's GGUF is written from."""
    return build_tiny(case.recipe, seed=seed, vocab_size=vocab_size, **case.overrides)


def write_gguf(
    path: Path,
    model: nn.Module,
    tokenizer: Any,
    arch: str,
    *,
    name: str = "tiny",
    declared_arch: str | None = None,
    chat_template: str | None = None,
    q8: bool = False,
) -> Path:
    """Write model and tokenizer as a GGUF of llama.cpp architecture ``arch``: float32, or with
    ``q8`` every matrix in Q8_0 (blocks of 32 along a row) as llama-quantize would.

    ``declared_arch`` writes another string as general.architecture (and key prefix), to make
    files that no reader knows."""
    writer = gguf.GGUFWriter(str(path), declared_arch or arch)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
    _hyperparameters(writer, arch, model.config)
    _tokenizer(writer, tokenizer, chat_template)
    for tensor_name, data in _tensors(model, arch):
        if q8 and data.ndim == 2 and data.shape[1] % Q8_BLOCK == 0:
            writer.add_tensor(tensor_name, gguf.quantize(data, Q8_0), raw_dtype=Q8_0)
        else:
            writer.add_tensor(tensor_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _hyperparameters(writer: gguf.GGUFWriter, arch: str, config: Any) -> None:
    """The ``{arch}.*`` keys llama.cpp writes for these architectures."""
    writer.add_block_count(config.num_hidden_layers)
    if arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta"))
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config.vocab_size)
    if arch in ("qwen3", "gemma2", "gemma3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    scaled = rope.get("full_attention", rope)
    if scaled.get("rope_type") in ("linear", "yarn"):
        kind = scaled["rope_type"]
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaled["factor"])
        if kind == "yarn":
            writer.add_rope_scaling_orig_ctx_len(scaled["original_max_position_embeddings"])
    if arch == "phi3":
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        if rope.get("rope_type") == "longrope":
            original = config.original_max_position_embeddings
            scale = config.max_position_embeddings / original
            writer.add_rope_scaling_orig_ctx_len(original)
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))


def q8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """What a matrix reads back as after Q8_0 (blocks run along rows, so row permutations commute)."""
    data = weight.detach().float().numpy()
    return torch.from_numpy(gguf.dequantize(gguf.quantize(data, Q8_0), Q8_0).reshape(data.shape).copy())


def _tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, chat_template: str | None) -> None:
    """A byte-level BPE vocabulary as llama.cpp stores one (``tokenizer.ggml.model = gpt2``)."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)  # Gemma's tokenizer class insists on one
    writer.add_add_bos_token(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for a Llama Q or K projection: per head, the two rotary halves interleaved."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensors(model: nn.Module, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor under its llama.cpp name, transformed as llama.cpp's converter transforms it."""
    config = model.config
    names = gguf.get_tensor_name_map(_model_arch(arch), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied and arch != "gpt2":
            continue  # llama.cpp reuses token_embd when the model ties them
        base, _, suffix = hf_name.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None:
            raise ValueError(f"no llama.cpp name for {hf_name} in {arch}")
        data = tensor.detach().float()
        if arch == "llama" and base.endswith("self_attn.q_proj"):
            data = _permute_rows(data, config.num_attention_heads)
        elif arch == "llama" and base.endswith("self_attn.k_proj"):
            data = _permute_rows(data, config.num_key_value_heads)
        elif arch in ("gemma", "gemma2", "gemma3") and hf_name.endswith("norm.weight"):
            data = data + 1  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w
        elif arch == "gpt2" and suffix == "weight" and base.endswith(("c_attn", "c_proj", "c_fc")):
            data = data.T  # Conv1D keeps (in, out); ggml wants (out, in)
        yield f"{mapped}.{suffix}", data.contiguous().numpy()
    yield from _rope_tensors(model, arch)


def _rope_tensors(model: nn.Module, arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """The per-frequency RoPE divisors llama.cpp adds for Llama 3 and LongRoPE models."""
    rope = getattr(model.config, "rope_parameters", None) or {}
    if arch == "llama" and rope.get("rope_type") == "llama3":
        rotary = model.model.rotary_emb
        dim = rotary.inv_freq.shape[0] * 2
        plain = 1.0 / rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        yield "rope_freqs.weight", (plain / rotary.inv_freq).numpy()
    if arch == "phi3" and rope.get("rope_type") == "longrope":
        yield "rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32)
        yield "rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32)


def _model_arch(arch: str) -> gguf.MODEL_ARCH:
    """The gguf-py enum member of a llama.cpp architecture name."""
    for member, text in gguf.MODEL_ARCH_NAMES.items():
        if text == arch:
            return member
    raise ValueError(f"gguf-py knows no architecture {arch!r}")
