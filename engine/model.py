"""ModelHandle: load a model by alias, hub id or local folder, with dtype, device and quantization.

Names resolve in this order: nothing or ``fact-world`` (the embedded default, built on
first use), an alias from kedit.toml's ``[aliases]`` (a hub id, or ``package:module/file.gguf``
for a GGUF shipped in a pip package), a ``.gguf`` file or a folder holding one, an existing
local folder, then a hub id (``org/name``). A GGUF is converted once to a plain checkpoint and
cached (``kedit.engine.gguf_files``). A model that cannot be had gives a ``ModelNotFound`` whose
message says how to get it.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from kedit.engine.arch import ArchAdapter
from kedit.engine.config import Config
from kedit.engine.errors import KeditError, ModelNotFound
from kedit.engine.gguf_files import PACKAGE_PREFIX, no_progress_bars, package_file, single_gguf

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

    class CausalLM(PreTrainedModel, GenerationMixin):
        """What AutoModelForCausalLM gives: a PreTrainedModel that can generate (a type only)."""


FACT_WORLD = "fact-world"
QUANTS = ("4bit", "8bit")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class Source:
    """Where a model name points: the embedded fact world, a local folder, a GGUF file or a hub id."""

    name: str  # what the user asked for
    kind: str  # "fact-world" | "local" | "gguf" | "hub"
    location: str  # folder path, GGUF file path or hub id


def resolve(name: str | None, config: Config) -> Source:
    """Turn a user's model name into a Source, without loading anything."""
    name = (name or config.get("model.default") or FACT_WORLD).strip()
    if name == FACT_WORLD:
        return Source(name, "fact-world", "")
    aliases = config.table("aliases")
    if name in aliases:
        target = str(aliases[name])
        if target.startswith(PACKAGE_PREFIX):
            return Source(name, "gguf", str(package_file(target)))
        return Source(name, "hub", target)
    path = Path(name).expanduser()
    if path.is_dir():
        inside = single_gguf(path)
        if inside is not None:
            return Source(name, "gguf", str(inside.resolve()))
        return Source(name, "local", str(path.resolve()))
    if path.is_file() and path.suffix == ".gguf":
        return Source(name, "gguf", str(path.resolve()))
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1
    if looks_like_path or path.suffix in (".safetensors", ".bin", ".gguf"):
        raise ModelNotFound(
            f"No model folder or GGUF file at {path}. Give --model a folder holding config.json and "
            f"the weights, a .gguf file, a hub id such as Qwen/Qwen2.5-7B-Instruct, or an alias "
            f"({', '.join(sorted(aliases)[:6])}, ...)."
        )
    if "/" not in name:
        known = ", ".join(sorted(aliases))
        raise ModelNotFound(
            f"'{name}' is neither an alias, a local folder nor a hub id (org/name). "
            f"Known aliases: {known}. Add your own under [aliases] in kedit.toml."
        )
    return Source(name, "hub", name)


def pick_device(device: str | None) -> str:
    """'auto' means the first CUDA GPU, else Apple's MPS, else the CPU."""
    if device and device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise KeditError(
                f"--device {device} was asked for, but torch sees no CUDA GPU. "
                "Use --device cpu, or install a CUDA build of torch."
            )
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str | None, device: str) -> torch.dtype | str:
    """'auto' is float32 on the CPU and the checkpoint's own dtype on an accelerator."""
    if not dtype or dtype == "auto":
        return torch.float32 if device == "cpu" else "auto"
    if dtype not in DTYPES:
        raise KeditError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16")
    return DTYPES[dtype]


def quantization_config(quant: str | None, compute_dtype: torch.dtype):
    """bitsandbytes settings for --quant 4bit|8bit (NF4 with double quantization for 4-bit)."""
    if not quant:
        return None
    if quant not in QUANTS:
        raise KeditError(f"unknown --quant {quant!r}; use 4bit or 8bit")
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def not_found_message(source: Source, reason: str) -> str:
    """One paragraph: what was looked for, where, and the ways to get it."""
    from huggingface_hub import constants

    alias = f" (alias '{source.name}')" if source.name != source.location else ""
    offline = "HF_HUB_OFFLINE=1 is set, so the hub was not asked. " if constants.HF_HUB_OFFLINE else ""
    return (
        f"Could not load the model {source.location}{alias}: it is not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and could not be fetched from the hub. {offline}"
        f"To get it, on a machine with network access run `hf download {source.location}` "
        f"(log in first with `hf auth login` if the model is gated), then copy the cache there "
        f"or point HF_HOME at it and set HF_HUB_OFFLINE=1; or download the folder anywhere and "
        f"pass it with --model /path/to/folder. Run without --model to use the embedded "
        f"fact-world model. ({reason})"
    )


class ModelHandle:
    """A loaded HF causal LM with its tokenizer and ArchAdapter, and how it was loaded."""

    def __init__(
        self, source: Source, model: CausalLM, tokenizer: PreTrainedTokenizerBase, *, quant: str | None, device: str
    ) -> None:
        self.source: Source = source
        self.model: CausalLM = model
        self.tokenizer: PreTrainedTokenizerBase = tokenizer
        self.quant: str | None = quant
        self.device: str = device
        self.adapter: ArchAdapter = ArchAdapter.for_model(model)
        # what methods keep between edits on this model (ROME's C and its factor): it goes with the model
        self.caches: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    @property
    def cache_key(self) -> str:
        """Names this model for on-disk caches: its source, its config and its quantization.

        The fact world is named by the hash of its build (its fact_world.json), so a rebuilt
        world is another model.
        """
        import hashlib

        where = self.source.location or self.source.name
        # name_or_path is typed Optional; a model from_pretrained read from a folder has it
        if self.source.kind == "fact-world":
            info = Path(cast(str, self.model.name_or_path)) / "fact_world.json"
            where = f"fact-world:{json.loads(info.read_text())['key']}"
        elif self.source.kind == "gguf":  # the converted folder is named <content hash>-v<format>
            where = f"gguf:{Path(cast(str, self.model.name_or_path)).name.split('-v')[0]}"
        blob = f"{self.source.kind}:{where}:{self.model.config.to_json_string()}:{self.quant}"
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def model_id(self) -> str:
        """The name kedit.toml's per-model tables use: the hub id or folder path, a GGUF's file
        name (``SmolLM2-135M-Instruct.Q4_1.gguf``, wherever it lies), or ``fact-world``."""
        if self.source.kind == "gguf":
            return Path(self.source.location).name
        return self.source.location or self.source.name

    @property
    def gguf_path(self) -> Path | None:
        """The GGUF file this model was loaded from, if it was."""
        return Path(self.source.location) if self.source.kind == "gguf" else None

    @property
    def is_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def describe(self) -> str:
        where = self.source.location or "embedded"
        quant = f", {self.quant}" if self.quant else ""
        kind = "chat" if self.is_chat else "base"
        return (
            f"{self.name} ({where}): {self.adapter.family}, {self.adapter.n_layers} layers, "
            f"{str(self.dtype).removeprefix('torch.')}{quant}, {self.device}, {kind} model"
        )

    @classmethod
    def load(
        cls,
        name: str | None,
        config: Config,
        *,
        quant: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        show_progress: bool = True,
    ) -> ModelHandle:
        """Load a model; every failure a user can fix becomes a KeditError."""
        if name is not None and not name.strip():
            raise ModelNotFound(
                "the model name is empty: give an alias, a hub id or a folder (leave --model out for the fact world)"
            )
        source = resolve(name, config)
        quant = quant or config.get("model.quant") or None
        device = pick_device(device or config.get("model.device"))
        torch_dtype = pick_dtype(dtype or config.get("model.dtype"), device)
        compute = (
            torch_dtype
            if isinstance(torch_dtype, torch.dtype)
            else (torch.float32 if device == "cpu" else torch.bfloat16)
        )
        qconfig = quantization_config(quant, compute)
        location = source.location
        if source.kind == "fact-world":
            from kedit.engine.factworld.build import BuildSettings, ensure_built

            location = str(
                ensure_built(BuildSettings.from_config(config.table("fact_world")), show_progress=show_progress)
            )
        trust = bool(config.get("model.trust_remote_code", False))
        if source.kind == "gguf":
            from kedit.engine.gguf_files import converted

            location = str(converted(Path(source.location), trust, show_progress)[0])
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust}
        if qconfig is not None:
            kwargs["quantization_config"] = qconfig
        if device == "cuda" and torch.cuda.device_count() > 1:
            kwargs["device_map"] = "auto"
        elif qconfig is not None or device != "cpu":
            kwargs["device_map"] = device
        with contextlib.nullcontext() if show_progress else no_progress_bars():
            model, tokenizer = _from_pretrained(source, location, kwargs)
        model.eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        return cls(source, model, tokenizer, quant=quant, device=device)


def _from_pretrained(source: Source, location: str, kwargs: dict[str, Any]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.kind == "local" and not (Path(location) / "config.json").is_file():
        raise ModelNotFound(
            f"Could not load the model folder {location}: it has no config.json. "
            f"Point --model at the folder that holds config.json, the weights "
            f"and the tokenizer files."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=kwargs["trust_remote_code"])
    except KeditError:
        raise
    except OSError as exc:
        if source.kind == "hub":
            raise ModelNotFound(not_found_message(source, _first_line(exc))) from None
        raise ModelNotFound(f"Could not load the model folder {location}: {_first_line(exc)}") from None
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise KeditError(
                f"{source.location} ships its own modeling code. kedit does not run it unless you "
                f"allow it: pass --trust-remote-code, or set trust_remote_code = true under [model] "
                f"in your config dir's kedit.toml, "
                f"if you trust the model's authors."
            ) from None
        raise KeditError(f"transformers cannot load {location}: {_first_line(exc)}") from None
    except ImportError as exc:
        raise KeditError(f"loading {source.location} needs a package that is missing: {_first_line(exc)}") from None
    except Exception as exc:  # damaged weights or a config transformers rejects  # noqa: BLE001
        raise KeditError(
            f"transformers cannot load {location} ({type(exc).__name__}: {_first_line(exc)}); "
            "its weights or config.json may be damaged"
        ) from None
    if len(tokenizer) == 0 or not tokenizer("hello", add_special_tokens=False)["input_ids"]:
        raise ModelNotFound(
            f"{location} has no usable tokenizer (tokenizer.json, tokenizer.model or vocab files); "
            "copy the tokenizer files into the folder beside config.json"
        )
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
