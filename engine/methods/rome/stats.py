"""C = E[k kᵀ]: the second moment of the keys (inputs of one layer's MLP output projection).

Computed once per model, layer and sample count from a corpus, and cached on disk. The
corpus, in order of preference: a text file the user names; a hub dataset (wikitext-103)
when the hub is reachable and ``datasets`` is installed; otherwise text the model samples
itself. The result says which one was used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kedit.engine import paths
from kedit.engine.errors import KeditError
from kedit.engine.methods.rome.key import capture_io
from kedit.engine.metrics import pad_right


@dataclass
class KeyStats:
    """The second moment and where it came from."""

    c: torch.Tensor  # (d_in, d_in), float32
    tokens: int
    source: str
    seconds: float = 0.0
    cached: bool = False


def corpus_texts(handle, n: int, tokens: int, corpus: Path | None,
                 progress: Callable[[str, int, int], None] | None = None) -> tuple[list[str], str]:
    """Up to n texts for the statistics, and a phrase naming their source."""
    if corpus is not None:
        path = Path(corpus).expanduser()
        if not path.is_file():
            raise KeditError(f"--stats-corpus {path} is not a file; give a UTF-8 text file")
        chunks = [c.strip() for c in path.read_text(encoding="utf-8", errors="replace").split("\n\n")]
        chunks = [c for c in chunks if c]
        if not chunks:
            raise KeditError(f"--stats-corpus {path} holds no text")
        return chunks[:n], f"the text file {path} ({min(n, len(chunks))} paragraphs)"
    hub = _hub_texts(n)
    if hub:
        return hub, f"the hub dataset wikitext-103-raw-v1 ({len(hub)} texts)"
    return _sampled_texts(handle, n, tokens, progress), f"text sampled from the model itself ({n} samples)"


def _hub_texts(n: int) -> list[str] | None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        from datasets import load_dataset  # optional dependency
    except ImportError:
        return None
    try:
        data = load_dataset("wikitext", "wikitext-103-raw-v1", split="train", streaming=True)
        out = []
        for row in data:
            if len(row["text"]) > 200:
                out.append(row["text"])
            if len(out) >= n:
                break
        return out
    except Exception:  # unreachable hub, missing dataset: fall back to sampling
        return None


@torch.no_grad()
def _sampled_texts(handle, n: int, tokens: int, progress) -> list[str]:
    model, tok = handle.model, handle.tokenizer
    device = next(model.parameters()).device
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out: list[str] = []
    batch = 64
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(0)
        while len(out) < n:
            b = min(batch, n - len(out))
            ids = torch.full((b, 1), start, dtype=torch.long, device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                 top_p=1.0, temperature=1.0, max_new_tokens=tokens,
                                 pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(gen[:, 1:], skip_special_tokens=True)
            if progress:
                progress("sampling text", len(out), n)
    return [t for t in out if t.strip()] or ["."]


@torch.no_grad()
def second_moment(handle, layer: int, texts: list[str], max_tokens: int,
                  progress: Callable[[str, int, int], None] | None = None) -> tuple[torch.Tensor, int]:
    """Σ k kᵀ / N over every real token of the texts."""
    model, tok = handle.model, handle.tokenizer
    module = handle.adapter.mlp_out(layer)
    device = next(model.parameters()).device
    d = handle.adapter.mlp_hidden_size
    acc_dtype = torch.float64 if d <= 8192 else torch.float32
    c = torch.zeros((d, d), dtype=acc_dtype, device=device)
    count = 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = 16
    for start in range(0, len(texts), batch):
        rows = [tok(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts[start:start + batch]]
        ids, mask = pad_right(rows, pad, device)
        with capture_io(module) as seen:
            model(input_ids=ids, attention_mask=mask)
        keys = seen["input"][mask.bool()].to(acc_dtype)
        c += keys.T @ keys
        count += keys.shape[0]
        if progress:
            progress("key statistics", min(start + batch, len(texts)), len(texts))
    return (c / max(count, 1)).float().cpu(), count


# The C last read from disk, so that a run of edits on one layer reads it (and factors it) once.
_LOADED: dict[Path, tuple[int, KeyStats]] = {}


def key_stats(handle, layer: int, n_samples: int, tokens: int, corpus: Path | None = None,
              progress: Callable[[str, int, int], None] | None = None, refresh: bool = False) -> KeyStats:
    """C for ``layer``, from the disk cache when it was computed before (unless ``refresh``)."""
    import time

    from safetensors.torch import load_file, save_file

    tag = "file-" + hashlib.sha256(str(Path(corpus).resolve()).encode()).hexdigest()[:8] if corpus else "auto"
    path = paths.cache_dir() / "stats" / handle.cache_key / f"layer{layer}-n{n_samples}-t{tokens}-{tag}.safetensors"
    if path.is_file() and not refresh:
        held = _LOADED.get(path)
        if held is not None and held[0] == path.stat().st_mtime_ns:
            return held[1]
        data = load_file(str(path))
        meta = _read_meta(path)
        stats = KeyStats(data["c"], int(meta.get("tokens", 0)), meta.get("source", "cache"), cached=True)
        _LOADED.clear()  # one C in memory at a time: a 7B model's is 1.4 GB
        _LOADED[path] = (path.stat().st_mtime_ns, stats)
        return stats
    started = time.perf_counter()
    texts, source = corpus_texts(handle, n_samples, tokens, corpus, progress)
    c, count = second_moment(handle, layer, texts, tokens, progress)
    with paths.atomic_path(path) as tmp:
        save_file({"c": c.contiguous()}, tmp, metadata={"tokens": str(count), "source": source})
    return KeyStats(c, count, source, time.perf_counter() - started)


def _read_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})
