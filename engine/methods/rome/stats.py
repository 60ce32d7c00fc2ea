"""C = E[k kᵀ]: the second moment of the keys (inputs of one layer's MLP output projection).

Computed once per model, layer and recipe from a corpus, and cached on disk. The corpus, in
order of preference: a text file the user names; a hub dataset (wikitext-103) when the hub may
be reachable and ``datasets`` is installed; otherwise text the model samples itself. The result
says which one was used.

What makes the first edit on a new model quick: every forward pass stops at the edit layer's
MLP output projection (the blocks above it cannot change the keys), and the model's own text
needs few samples. Measured on SmolLM2-135M: C from 32 samples of 64 tokens leads ROME to the
same edits and nearly the same locality as C from 1,000 samples of 128 tokens, at a thirtieth
of the cost; Python's own documentation, read instead of generated, was cheaper per token but
a worse C than either (its keys are not the model's). Documents (a file, the hub) are packed
into rows of ``tokens`` tokens, so no position is padding.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kedit.engine import paths
from kedit.engine.errors import KeditError
from kedit.engine.methods.hooks import run_until
from kedit.engine.metrics import pad_right

Progress = Callable[[str, int, int], None]

# Bump when the way C is computed from a corpus changes: it is part of the cache file's name.
RECIPE = 4
TOKENS_PER_PASS = 4096  # rows are batched up to about this many tokens per forward pass
TOKENS_PER_WIDTH = 4 / 3  # the automatic sample count: this many tokens per key dimension


@dataclass
class KeyStats:
    """The second moment and where it came from."""

    c: torch.Tensor  # (d_in, d_in), float32
    tokens: int
    source: str
    seconds: float = 0.0
    cached: bool = False
    shrinkage: float = 0.0  # the Ledoit-Wolf weight on μI that c carries

    def raw(self) -> torch.Tensor:
        """The plain mean of k kᵀ, the shrinkage taken back out: (c - wμI) / (1 - w), μ the mean of
        c's diagonal (shrinking keeps it). Its small eigenvalues are the directions the corpus's
        keys do not use (AlphaEdit's null space)."""
        w = self.shrinkage
        if w <= 0:
            return self.c
        if w >= 1:
            raise KeditError("the key statistics were shrunk all the way to a multiple of I; use more samples")
        mu = float(self.c.diagonal().mean())
        out = self.c.double().clone()
        out.diagonal().sub_(w * mu)
        return (out / (1 - w)).float()


@dataclass(frozen=True)
class Corpus:
    """Where C's texts come from: a cache tag naming the recipe, a phrase for the user, and a
    loader (None when the source is not there: the hub unreachable)."""

    tag: str
    phrase: str
    load: Callable[[], list[str] | None]
    packed: bool  # documents cut into rows of equal length, vs one (truncated) row per text


# -- corpora ---------------------------------------------------------------------------------


def file_texts(corpus: Path) -> list[str]:
    """A user's UTF-8 text file, split into paragraphs at blank lines."""
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise KeditError(f"--stats-corpus {path} is not a file; give a UTF-8 text file")
    chunks = [c.strip() for c in path.read_text(encoding="utf-8", errors="replace").split("\n\n")]
    chunks = [c for c in chunks if c]
    if not chunks:
        raise KeditError(f"--stats-corpus {path} holds no text")
    return chunks


def hub_reachable() -> bool:
    """Whether the hub corpus may be tried: not offline, and ``datasets`` importable."""
    import importlib.util

    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and importlib.util.find_spec("datasets") is not None


def hub_texts(n: int) -> list[str] | None:
    """n paragraphs of wikitext-103, or None when the hub does not answer."""
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
def sampled_texts(handle, n: int, tokens: int, progress: Progress | None = None) -> list[str]:
    """n texts of up to ``tokens`` tokens the model writes from its start token (seed 0,
    temperature 1, no truncation of the distribution), 64 at a time."""
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
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=tokens,
                pad_token_id=tok.pad_token_id,
            )
            out += tok.batch_decode(gen[:, 1:], skip_special_tokens=True)
            if progress:
                progress("sampling text", len(out), n)
    return [t for t in out if t.strip()] or ["."]


def _sampled_once(handle, n: int, tokens: int, progress: Progress | None = None) -> list[str]:
    """``sampled_texts``, kept with the model: the layers of a range (MEMIT's) share one draw."""
    kept: dict[tuple[int, int], list[str]] = handle.caches.setdefault("rome.sampled", {})
    if (n, tokens) not in kept:
        kept[(n, tokens)] = sampled_texts(handle, n, tokens, progress)
    return kept[(n, tokens)]


def digest(texts: Sequence[str]) -> str:
    """A short hash of texts: the cache tells one edition of a corpus file from another."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", errors="replace") + b"\0")
    return h.hexdigest()[:8]


def corpora(handle, n: int, tokens: int, corpus: Path | None, progress: Progress | None = None) -> list[Corpus]:
    """The corpora to try, in order: the user's file alone; else the hub when it may be
    reachable, then the model's own text."""
    if corpus is not None:
        texts = file_texts(corpus)
        return [Corpus(f"file-{digest(texts)}", f"the text file {Path(corpus).expanduser()}", lambda: texts, True)]
    own = Corpus(
        "sampled",
        f"text sampled from the model itself ({n} samples of up to {tokens} tokens)",
        lambda: _sampled_once(handle, n, tokens, progress),
        False,
    )
    if not hub_reachable():
        return [own]
    return [Corpus("hub-wikitext103", "the hub dataset wikitext-103-raw-v1", lambda: hub_texts(n), True), own]


# -- rows and keys ---------------------------------------------------------------------------


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text of its own accord (a BOS token, or nothing)."""
    full = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return list(full[:i])
    return []


def token_rows(tokenizer, texts: Sequence[str], n: int, tokens: int, packed: bool) -> list[list[int]]:
    """Up to n rows of at most ``tokens`` ids, each opening as the tokenizer opens a text.

    Packed: the texts joined by blank lines and cut into rows of exactly ``tokens`` ids, taken
    evenly across the whole corpus when it holds more than n. Else one row per text, truncated.
    """
    if not packed:
        return [tokenizer(t, truncation=True, max_length=tokens)["input_ids"] for t in texts[:n]]
    prefix = special_prefix(tokenizer)
    body = tokens - len(prefix)
    if body < 1:
        raise KeditError(f"rome.stats_tokens = {tokens} leaves no room for text; use 16 or more")
    stream = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    whole = max(len(stream) // body, 1)
    picks = torch.linspace(0, whole - 1, min(n, whole)).round().long().unique().tolist()
    return [prefix + stream[i * body : (i + 1) * body] for i in picks]


@torch.no_grad()
def layer_keys(model, module: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The keys (inputs of ``module``) at every position of a batch, running the model only up to them."""
    return run_until(model, module, input_ids=ids, attention_mask=mask)["input"]


@dataclass
class Moment:
    """Σ k kᵀ, Σ ‖k‖⁴ and the count, summed over batches of keys."""

    outer: torch.Tensor
    fourth: float = 0.0
    count: int = 0

    def add(self, keys: torch.Tensor) -> None:
        """Take in a batch of keys (tokens, d)."""
        self.outer += (keys.T @ keys).to(self.outer.dtype)  # each batch's product in float32, the sum wider
        self.fourth += float(keys.pow(2).sum(1).double().pow(2).sum())
        self.count += keys.shape[0]

    def shrunk(self) -> tuple[torch.Tensor, float]:
        """The Ledoit-Wolf estimate of E[k kᵀ] and its weight on μI (μ the mean eigenvalue).

        With fewer tokens than a few times the key width, the plain mean of k kᵀ is far from
        E[k kᵀ] in its small eigenvalues, which C⁻¹k* amplifies; shrinking toward μI by the
        weight the keys' own spread calls for (Ledoit and Wolf 2004) repairs that, and fades
        out as tokens grow (0.33 for 2,000 tokens of SmolLM2's 1536-wide keys, 0.01 by 100,000).
        """
        n = max(self.count, 1)
        s = self.outer / n
        d = s.shape[0]
        mu = float(s.diagonal().mean())
        frob2 = float(torch.linalg.vector_norm(s, dtype=torch.float64)) ** 2
        spread = frob2 - 2 * mu * float(s.diagonal().sum()) + mu * mu * d  # ‖S - μI‖²
        noise = (self.fourth / n - frob2) / n  # Σ‖k kᵀ - S‖² / n²
        weight = min(1.0, max(noise, 0.0) / spread) if spread > 0 else 1.0
        s.mul_(1 - weight).diagonal().add_(weight * mu)
        return s.float(), weight


@torch.no_grad()
def second_moment(
    handle, layer: int, rows: Sequence[Sequence[int]], progress: Progress | None = None
) -> tuple[torch.Tensor, int, float]:
    """C from every real token of the rows: the Ledoit-Wolf shrunk mean of k kᵀ, with the token
    count and the shrinkage weight."""
    model, tok = handle.model, handle.tokenizer
    module = handle.adapter.mlp_out(layer)
    device = next(model.parameters()).device
    d = handle.adapter.mlp_hidden_size
    acc = Moment(torch.zeros((d, d), dtype=torch.float64 if d <= 8192 else torch.float32, device=device))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = max(1, TOKENS_PER_PASS // max(max(len(r) for r in rows), 1))
    for start in range(0, len(rows), batch):
        ids, mask = pad_right(rows[start : start + batch], pad, device)
        acc.add(layer_keys(model, module, ids, mask)[mask.bool()].float())
        if progress:
            progress("key statistics", min(start + batch, len(rows)), len(rows))
    c, weight = acc.shrunk()
    return c.cpu(), acc.count, weight


def auto_samples(width: int, tokens: int) -> int:
    """How many samples of ``tokens`` tokens make about 4 tokens per 3 key dimensions (SmolLM2-135M's
    1536-wide keys: 64 samples of 32 tokens), 16 at least: wider keys need more to pin down C."""
    return max(16, math.ceil(TOKENS_PER_WIDTH * width / tokens))


# -- the cache -------------------------------------------------------------------------------


def stats_path(handle, layer: int, n_samples: int, tokens: int, tag: str) -> Path:
    """Where C for this model, layer, size and corpus recipe is kept."""
    name = f"layer{layer}-n{n_samples}-t{tokens}-{tag}-r{RECIPE}.safetensors"
    return paths.cache_dir() / "stats" / handle.cache_key / name


class StatsCache:
    """The C last read from disk, so that a run of edits on one layer reads it (and factors it)
    once. One C in memory at a time: a 7B model's is 1.4 GB."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.mtime = 0
        self.stats: KeyStats | None = None

    def read(self, path: Path) -> KeyStats:
        """C from ``path``, from memory when that file has not changed since it was read."""
        from safetensors import safe_open

        mtime = path.stat().st_mtime_ns
        if self.stats is not None and path == self.path and mtime == self.mtime:
            return self.stats
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            c = fh.get_tensor("c")
        self.path, self.mtime = path, mtime
        self.stats = KeyStats(
            c,
            int(meta.get("tokens", 0)),
            meta.get("source", "cache"),
            cached=True,
            shrinkage=float(meta.get("shrinkage", 0.0)),
        )
        return self.stats


def _cache_of(handle) -> StatsCache:
    """The handle's in-memory C: it lives and goes with the model."""
    cache: StatsCache = handle.caches.setdefault("rome.stats", StatsCache())
    return cache


def key_stats(
    handle,
    layer: int,
    n_samples: int,
    tokens: int,
    corpus: Path | None = None,
    progress: Progress | None = None,
    refresh: bool = False,
) -> KeyStats:
    """C for ``layer`` from ``n_samples`` rows of up to ``tokens`` tokens of the first corpus
    that is there (0 samples: ``auto_samples``); from the disk cache when it was computed before
    (unless ``refresh``)."""
    from safetensors.torch import save_file

    if n_samples <= 0:
        n_samples = auto_samples(handle.adapter.mlp_hidden_size, tokens)
    for source in corpora(handle, n_samples, tokens, corpus, progress):
        path = stats_path(handle, layer, n_samples, tokens, source.tag)
        if path.is_file() and not refresh:
            return _cache_of(handle).read(path)
        started = time.perf_counter()
        texts = source.load()
        if not texts:
            continue  # the hub did not answer
        rows = token_rows(handle.tokenizer, texts, n_samples, tokens, source.packed)
        c, count, weight = second_moment(handle, layer, rows, progress)
        phrase = f"{source.phrase}, {count:,} tokens, shrinkage {weight:.2f}"
        with paths.atomic_path(path) as tmp:
            meta = {"tokens": str(count), "source": phrase, "shrinkage": repr(weight)}
            save_file({"c": c.contiguous()}, tmp, metadata=meta)
        return KeyStats(c, count, phrase, time.perf_counter() - started, shrinkage=weight)
    raise KeditError("no corpus for the key statistics")  # unreachable: sampling always gives text
