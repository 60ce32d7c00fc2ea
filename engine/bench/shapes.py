"""Random-weight models of real shapes (kedit.toml [shapes]), so the bench runs at real scale offline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from kedit.engine.bench.requests import request_words
from kedit.engine.errors import KeditError

if TYPE_CHECKING:
    from kedit.engine.model import CausalLM

Progress = Callable[[str, int, int], None]


# -- random-weight models of real shapes ---------------------------------------------------

# Token ids every random model and its tokenizer agree on.
PAD, BOS, EOS, UNK = 0, 1, 2, 3


def random_model(
    shape: dict[str, Any], n_layers: int | None = None, dtype: str = "float32", device: str = "cpu", seed: int = 0
) -> CausalLM:
    """A random-weight causal LM with a real model's dimensions (kedit.toml [shapes]).

    The weights are made on ``device`` directly, so a 7B shape never passes through host memory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(shape)
    model_type = shape.pop("model_type", None)
    if model_type is None:
        raise KeditError("a shape needs its model_type")
    if n_layers is not None:
        shape["num_hidden_layers"] = int(n_layers)
    shape = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, **shape}
    config = AutoConfig.for_model(model_type, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.eval()


def word_tokenizer(vocab_size: int, words: Sequence[str]):
    """A word-level tokenizer with exactly ``vocab_size`` ids, for a random-weight model.

    ``words`` get the first ids after the specials; the rest are filler words ``t<id>``,
    so that any id the model writes decodes to a word that encodes back to the same id.
    Prompts come out about as many tokens long as a real tokenizer makes them.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK}
    for w in words:
        if len(vocab) < vocab_size and w not in vocab:
            vocab[w] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def shape_dims(config: Any, name: str) -> dict[str, Any]:
    """The dimensions of kedit.toml's [shapes.NAME]."""
    shapes = config.table("shapes")
    if name not in shapes:
        raise KeditError(f"no shape {name} in kedit.toml [shapes]; known: {', '.join(shapes)}")
    return dict(shapes[name])


def shape_handle(
    config: Any,
    name: str,
    *,
    n_layers: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    quant: str | None = None,
    seed: int = 0,
    progress: Progress | None = None,
):
    """A ModelHandle on a random-weight model of the kedit.toml shape ``name``.

    Unquantized, the model is made in place on the device. With ``quant`` it is saved to a
    temporary folder and loaded back through the same bitsandbytes path as a real model.
    The model's id for kedit.toml's per-model settings is the alias of the same name, so a
    qwen2.5-7b shape gets the settings of Qwen/Qwen2.5-7B-Instruct (its ROME layer).
    """
    import tempfile

    from kedit.engine.model import ModelHandle, Source, pick_device, pick_dtype

    dims = shape_dims(config, name)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    if not isinstance(torch_dtype, torch.dtype):  # "auto": what these models ship in
        torch_dtype = torch.bfloat16
    source = Source(f"random {name}", "shape", str(config.table("aliases").get(name, f"random {name}")))
    if progress:
        progress(f"building a random {name}", 0, 1)
    tokenizer = word_tokenizer(int(dims["vocab_size"]), request_words())
    make_on = "cpu" if quant else device
    model = random_model(dims, n_layers, str(torch_dtype).removeprefix("torch."), make_on, seed)
    if quant:
        with tempfile.TemporaryDirectory(prefix="kedit-shape-") as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            del model
            handle = ModelHandle.load(
                folder,
                config,
                quant=quant,
                dtype=str(torch_dtype).removeprefix("torch."),
                device=device,
                show_progress=False,
            )
        handle.source = source
    else:
        tokenizer.padding_side = "right"
        handle = ModelHandle(source, model, tokenizer, quant=None, device=device)
    if progress:
        progress(f"building a random {name}", 1, 1)
    return handle
