"""Tiny random-weight causal LMs, one per supported family (and per model line that needs its own
config, such as Llama 3's rope scaling), so tests never need the hub."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 3
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
VOCAB = 128
POSITIONS = 64
SLIDING_WINDOW = 4  # shorter than the test prompts, so windowed layers really differ from global ones

# Small ids so every embedding lookup (padding_idx, generate's pad/eos) stays inside VOCAB.
_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

# Shared keyword arguments of the Llama-style configs.
_LLAMA_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": HEADS // 2,
    "max_position_embeddings": POSITIONS,
    **_TOKENS,
}

# Llama 3.x: rope_theta 500k and Llama 3.1's "llama3" frequency rescaling, with tied embeddings
# (3.2 1B/3B). On a 16-wide head it leaves 4 frequencies alone, blends 1 and divides 3 by 8.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500_000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Phi-4-mini: a phi3 model with partial rotary (0.75 of each head), LongRoPE and tied embeddings.
PHI4_ROTARY_FRACTION = 0.75
_PHI4_PAIRS = int(HEAD_DIM * PHI4_ROTARY_FRACTION) // 2
PHI4_ROPE = {
    "rope_type": "longrope",
    "rope_theta": 10_000.0,
    "partial_rotary_factor": PHI4_ROTARY_FRACTION,
    "factor": 2.0,  # max_position_embeddings / original_max_position_embeddings
    "short_factor": [1.0 + 0.25 * i for i in range(_PHI4_PAIRS)],
    "long_factor": [2.0**i for i in range(_PHI4_PAIRS)],
}

# Gemma 3 text: 5 local layers to 1 global in the real models; here local, global, local.
GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]

_RECIPES: dict[str, Callable[[dict[str, Any]], PretrainedConfig]] = {
    "llama": lambda o: LlamaConfig(**{**_LLAMA_LIKE, **o}),
    "llama3": lambda o: LlamaConfig(
        **{**_LLAMA_LIKE, "tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE, **o}
    ),
    "qwen2": lambda o: Qwen2Config(**{**_LLAMA_LIKE, **o}),
    "qwen3": lambda o: Qwen3Config(**{**_LLAMA_LIKE, "head_dim": HEAD_DIM, **o}),
    "mistral": lambda o: MistralConfig(**{**_LLAMA_LIKE, "head_dim": HEAD_DIM, **o}),
    "gemma": lambda o: GemmaConfig(**{**_LLAMA_LIKE, "head_dim": HEAD_DIM, **o}),
    "gemma2": lambda o: Gemma2Config(
        **{**_LLAMA_LIKE, "head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM, "sliding_window": 16, **o}
    ),
    "gemma3_text": lambda o: Gemma3TextConfig(
        **{
            **_LLAMA_LIKE,
            "head_dim": HEAD_DIM,
            "query_pre_attn_scalar": HEAD_DIM,
            "sliding_window": SLIDING_WINDOW,
            "layer_types": GEMMA3_LAYER_TYPES,
            **o,
        }
    ),
    "phi3": lambda o: Phi3Config(**{**_LLAMA_LIKE, "original_max_position_embeddings": POSITIONS, **o}),
    "phi4-mini": lambda o: Phi3Config(
        **{
            **_LLAMA_LIKE,
            "original_max_position_embeddings": POSITIONS // 2,
            "partial_rotary_factor": PHI4_ROTARY_FRACTION,
            "tie_word_embeddings": True,
            "rope_parameters": PHI4_ROPE,
            **o,
        }
    ),
    "gpt2": lambda o: GPT2Config(
        **{
            "vocab_size": VOCAB,
            "n_embd": HIDDEN,
            "n_layer": LAYERS,
            "n_head": HEADS,
            "n_inner": INTERMEDIATE,
            "n_positions": POSITIONS,
            **_TOKENS,
            **o,
        }
    ),
    "gptj": lambda o: GPTJConfig(
        **{
            "vocab_size": VOCAB,
            "n_embd": HIDDEN,
            "n_layer": LAYERS,
            "n_head": HEADS,
            "n_inner": INTERMEDIATE,
            "n_positions": POSITIONS,
            "rotary_dim": HEAD_DIM // 2,
            **_TOKENS,
            **o,
        }
    ),
    "gpt_neox": lambda o: GPTNeoXConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "intermediate_size": INTERMEDIATE,
            "max_position_embeddings": POSITIONS,
            **_TOKENS,
            **o,
        }
    ),
    "opt": lambda o: OPTConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "ffn_dim": INTERMEDIATE,
            "word_embed_proj_dim": HIDDEN,
            "max_position_embeddings": POSITIONS,
            **_TOKENS,
            **o,
        }
    ),
}

# Model lines with their own recipe, and the model_type each loads as.
VARIANTS: dict[str, str] = {"llama3": "llama", "phi4-mini": "phi3"}


def model_type_of(name: str) -> str:
    """The HF model_type a recipe name builds (a variant's family, else the name itself)."""
    return VARIANTS.get(name, name)


def tiny_config(name: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config (hidden 64, 3 layers, 4 heads, vocab 128) for a model_type or a variant name;
    keyword arguments override the recipe's values."""
    if name not in _RECIPES:
        raise ValueError(f"tiny_config has no recipe for {name!r}")
    return _RECIPES[name](overrides)


def build_tiny(name: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """Instantiate a seeded random-weight causal LM in eval mode for a model_type or variant."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, **overrides))
    return model.eval()


def make_tiny(name: str, path: str | Path, seed: int = 0) -> Path:
    """Save a seeded random-weight causal LM with save_pretrained into path and return it."""
    path = Path(path)
    build_tiny(name, seed).save_pretrained(path)
    return path


def char_tokenizer():
    """A character-level tokenizer with fewer than VOCAB ids, for loading tiny models as a user would."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 match _TOKENS
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars + ["<unk>"])}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_tiny_with_tokenizer(name: str, path: Path, seed: int = 0) -> Path:
    """A tiny random model plus a character tokenizer in one folder: loadable by name like a real one."""
    make_tiny(name, path, seed=seed)
    char_tokenizer().save_pretrained(path)
    return path


def full_pass_io(model: torch.nn.Module, module: torch.nn.Module, **inputs: Any) -> dict[str, torch.Tensor]:
    """``module``'s input and output in a whole forward pass of ``model`` (no early stop), to check
    code that stops there against."""
    seen: dict[str, torch.Tensor] = {}

    def hook(mod: torch.nn.Module, args: tuple, output: Any) -> None:
        seen["input"], seen["output"] = args[0], output

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen
