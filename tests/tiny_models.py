"""Tiny random-weight causal LMs, one per supported family, so tests never need the hub."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers import (
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
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


def tiny_config(model_type: str) -> PretrainedConfig:
    """Build a tiny config (hidden 64, 3 layers, 4 heads, vocab 128) for a model_type."""
    if model_type == "llama":
        return LlamaConfig(**_LLAMA_LIKE)
    if model_type == "qwen2":
        return Qwen2Config(**_LLAMA_LIKE)
    if model_type == "qwen3":
        return Qwen3Config(**_LLAMA_LIKE, head_dim=HEAD_DIM)
    if model_type == "mistral":
        return MistralConfig(**_LLAMA_LIKE, head_dim=HEAD_DIM)
    if model_type == "gemma":
        return GemmaConfig(**_LLAMA_LIKE, head_dim=HEAD_DIM)
    if model_type == "gemma2":
        return Gemma2Config(**_LLAMA_LIKE, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=16)
    if model_type == "phi3":
        return Phi3Config(**_LLAMA_LIKE, original_max_position_embeddings=POSITIONS)
    if model_type == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE,
            n_positions=POSITIONS, **_TOKENS,
        )
    if model_type == "gptj":
        return GPTJConfig(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE,
            n_positions=POSITIONS, rotary_dim=HEAD_DIM // 2, **_TOKENS,
        )
    if model_type == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS, **_TOKENS,
        )
    if model_type == "opt":
        return OPTConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN, max_position_embeddings=POSITIONS, **_TOKENS,
        )
    raise ValueError(f"tiny_config has no recipe for model_type {model_type!r}")


def build_tiny(model_type: str, seed: int = 0) -> torch.nn.Module:
    """Instantiate a seeded random-weight causal LM in eval mode for a model_type."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    return model.eval()


def make_tiny(model_type: str, path: str | Path, seed: int = 0) -> Path:
    """Save a seeded random-weight causal LM with save_pretrained into path and return it."""
    path = Path(path)
    build_tiny(model_type, seed).save_pretrained(path)
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
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_tiny_with_tokenizer(model_type: str, path: Path, seed: int = 0) -> Path:
    """A tiny random model plus a character tokenizer in one folder: loadable by name like a real one."""
    make_tiny(model_type, path, seed=seed)
    char_tokenizer().save_pretrained(path)
    return path
