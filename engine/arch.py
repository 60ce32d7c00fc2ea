"""Where things live in a HF causal LM, so editing methods never name modules themselves.

Module paths were read from the transformers 5.x modeling files. ``ArchAdapter.for_model``
dispatches on ``model.config.model_type`` and checks the paths against the live model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kedit.engine.errors import UnsupportedArchitecture

SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "gemma3_text": "Gemma3",
    "phi3": "Phi-3",
    "gpt2": "GPT-2",
    "gptj": "GPT-J",
    "gpt_neox": "GPT-NeoX",
}

# Families whose token embeddings are multiplied by sqrt(hidden_size) before layer 0.
_SQRT_SCALED_EMBEDDINGS = frozenset({"gemma", "gemma2", "gemma3_text"})


@dataclass(frozen=True)
class _Layout:
    """Attribute names of one family, relative to the causal LM (base) and to a decoder block."""

    base: str
    layers: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    embed: str
    final_norm: str
    mlp: str = "mlp"
    lm_head: str = "lm_head"


_LLAMA_LAYOUT = _Layout(
    base="model",
    layers="layers",
    mlp_in=("gate_proj", "up_proj"),
    mlp_out="down_proj",
    embed="embed_tokens",
    final_norm="norm",
)

_LAYOUTS: dict[str, _Layout] = {
    "llama": _LLAMA_LAYOUT,
    "qwen2": _LLAMA_LAYOUT,
    "qwen3": _LLAMA_LAYOUT,
    "mistral": _LLAMA_LAYOUT,
    "gemma": _LLAMA_LAYOUT,
    "gemma2": _LLAMA_LAYOUT,
    # Gemma 3 wraps each sub-block in pre/post norms and q/k norms, but names its MLP like Llama.
    "gemma3_text": _LLAMA_LAYOUT,
    "phi3": replace(_LLAMA_LAYOUT, mlp_in=("gate_up_proj",)),
    "gpt2": _Layout(
        base="transformer",
        layers="h",
        mlp_in=("c_fc",),
        mlp_out="c_proj",
        embed="wte",
        final_norm="ln_f",
    ),
    "gptj": _Layout(
        base="transformer",
        layers="h",
        mlp_in=("fc_in",),
        mlp_out="fc_out",
        embed="wte",
        final_norm="ln_f",
    ),
    "gpt_neox": _Layout(
        base="gpt_neox",
        layers="layers",
        mlp_in=("dense_h_to_4h",),
        mlp_out="dense_4h_to_h",
        embed="embed_in",
        final_norm="final_layer_norm",
    ),
}


def supported_families_text() -> str:
    """List the supported families with their model_type, for messages a user reads."""
    return ", ".join(f"{family} ({model_type})" for model_type, family in SUPPORTED_FAMILIES.items())


def _in_features(module: nn.Module) -> int:
    """Input width of a projection, whether nn.Linear, a bitsandbytes Linear or a GPT-2 Conv1D."""
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0])
    if isinstance(module, nn.Linear):  # bnb Linear4bit and Linear8bitLt subclass nn.Linear
        return int(module.in_features)
    raise UnsupportedArchitecture(f"Expected a linear projection, found {type(module).__name__}.")


@dataclass
class ArchAdapter:
    """Names the modules of one loaded causal LM that editing and steering methods touch."""

    model_type: str
    family: str
    n_layers: int
    hidden_size: int  # residual stream width
    mlp_hidden_size: int  # input width of the MLP output projection (intermediate size)
    out_proj_conv1d: bool  # True when the out projection is a Conv1D: weight stored (in, out)
    model: nn.Module = field(repr=False, compare=False)
    _layout: _Layout = field(repr=False, compare=False)

    @classmethod
    def for_model(cls, model: nn.Module) -> ArchAdapter:
        """Build the adapter for a HF causal LM, or raise UnsupportedArchitecture naming the families."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in _LAYOUTS:
            raise UnsupportedArchitecture(
                f"kedit cannot edit models of type {model_type!r} ({type(model).__name__}). "
                f"Supported families: {supported_families_text()}."
            )
        layout = _LAYOUTS[model_type]
        layers = _checked_submodule(model, model_type, f"{layout.base}.{layout.layers}")
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise UnsupportedArchitecture(
                f"The {model_type} model has no decoder blocks at {layout.base}.{layout.layers}."
            )
        for path in (f"{layout.base}.{layout.embed}", f"{layout.base}.{layout.final_norm}", layout.lm_head):
            _checked_submodule(model, model_type, path)
        block = f"{layout.base}.{layout.layers}.0.{layout.mlp}"
        for name in layout.mlp_in:
            _checked_submodule(model, model_type, f"{block}.{name}")
        out_proj = _checked_submodule(model, model_type, f"{block}.{layout.mlp_out}")
        config: Any = model.config
        return cls(
            model_type=model_type,
            family=SUPPORTED_FAMILIES[model_type],
            n_layers=len(layers),
            hidden_size=int(config.hidden_size),
            mlp_hidden_size=_in_features(out_proj),
            out_proj_conv1d=isinstance(out_proj, Conv1D),
            model=model,
            _layout=layout,
        )

    def _index(self, i: int) -> int:
        """Normalize a layer index (negative counts from the end), raising IndexError when out of range."""
        if not -self.n_layers <= i < self.n_layers:
            raise IndexError(f"layer {i} out of range: the model has {self.n_layers} layers")
        return i % self.n_layers

    def layers(self) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return cast(nn.ModuleList, self.model.get_submodule(f"{self._layout.base}.{self._layout.layers}"))

    def layer_name(self, i: int) -> str:
        """Full dotted module path of decoder block i, e.g. "model.layers.3"."""
        return f"{self._layout.base}.{self._layout.layers}.{self._index(i)}"

    def layer(self, i: int) -> nn.Module:
        """Decoder block i."""
        return self.model.get_submodule(self.layer_name(i))

    def mlp(self, i: int) -> nn.Module:
        """The MLP of decoder block i."""
        return self.layer(i).get_submodule(self._layout.mlp)

    def mlp_in(self, i: int) -> list[nn.Module]:
        """Input projections of block i's MLP (gate+up, gate_up_proj, c_fc, fc_in or dense_h_to_4h)."""
        mlp = self.mlp(i)
        return [mlp.get_submodule(name) for name in self._layout.mlp_in]

    def mlp_out_name(self, i: int) -> str:
        """Full dotted module path of block i's MLP output projection, e.g. "model.layers.3.mlp.down_proj"."""
        return f"{self.layer_name(i)}.{self._layout.mlp}.{self._layout.mlp_out}"

    def mlp_out(self, i: int) -> nn.Module:
        """Block i's MLP output projection: nn.Linear, Conv1D (GPT-2) or a bitsandbytes Linear when quantized."""
        return self.model.get_submodule(self.mlp_out_name(i))

    def embed(self) -> nn.Module:
        """The token embedding (for Gemma it multiplies by its own scale; GPT-2 adds wpe after it)."""
        return self.model.get_submodule(f"{self._layout.base}.{self._layout.embed}")

    def final_norm(self) -> nn.Module:
        """The norm applied after the last block, before lm_head."""
        return self.model.get_submodule(f"{self._layout.base}.{self._layout.final_norm}")

    def lm_head(self) -> nn.Module:
        """The unembedding projection to vocabulary logits."""
        return self.model.get_submodule(self._layout.lm_head)

    def residual(self, output: Any) -> torch.Tensor:
        """The hidden state in a decoder block's forward output (v5 blocks return a tensor; GPT-J a tuple)."""
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"Cannot find the hidden state in a decoder output of type {type(output).__name__}")
        return hidden

    def replace_residual(self, output: Any, hidden: torch.Tensor) -> Any:
        """A copy of a decoder block's output with the hidden state swapped, for returning from forward hooks."""
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        if isinstance(output, list):
            return [hidden, *output[1:]]
        return hidden

    def embed_weight_scale(self) -> float:
        """Factor the embedding module applies to its weight rows itself (Gemma in v5: sqrt(hidden); else 1.0)."""
        embed = self.embed()
        scale = getattr(embed, "embed_scale", None)
        if isinstance(scale, torch.Tensor):
            return float(scale.to(cast(torch.Tensor, embed.weight).dtype))
        return 1.0 if scale is None else float(scale)

    def embed_scale(self) -> float:
        """Multiplier applied to embed(ids) before layer 0: 1.0 in v5, where Gemma's embedding scales itself."""
        if self.model_type not in _SQRT_SCALED_EMBEDDINGS or hasattr(self.embed(), "embed_scale"):
            return 1.0
        return math.sqrt(self.hidden_size)  # older layouts scale in the model's forward instead

    def logit_softcap(self) -> float | None:
        """Cap c of the model's logits = c * tanh(lm_head(h) / c) (Gemma2; Gemma3 if set), or None: to redo logits."""
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return None if cap is None else float(cap)


def _checked_submodule(model: nn.Module, model_type: str, path: str) -> nn.Module:
    """Fetch a submodule by dotted path, turning a missing one into UnsupportedArchitecture."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UnsupportedArchitecture(
            f"The {model_type} model ({type(model).__name__}) has no module {path!r}; "
            "kedit expects a causal LM as loaded by AutoModelForCausalLM."
        ) from None
