"""Timing generation and metering memory: medians of interleaved runs, peak memory per device."""

from __future__ import annotations

import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kedit.engine.arch import ArchAdapter
from kedit.engine.bench.shapes import PAD

if TYPE_CHECKING:
    from kedit.engine.model import CausalLM

Progress = Callable[[str, int, int], None]


# -- memory ----------------------------------------------------------------------------------


class MemoryMeter:
    """CUDA max allocated on a GPU; on the CPU the process's RSS and its peak (VmHWM), whose
    peak Linux lets a process reset (/proc/self/clear_refs), so phases get their own peaks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.kind = "CUDA max allocated" if self.cuda else "peak RSS"
        self.resettable = True

    @staticmethod
    def _status(field_name: str) -> int | None:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return None
        m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
        return int(m.group(1)) * 1024 if m else None

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False  # peaks then cover the whole process so far

    def peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = self._status("VmHWM")
        if hwm is not None:
            return hwm
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    def now(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return self._status("VmRSS") or self.peak()

    def held(self) -> int:
        """Bytes in live tensors: CUDA's allocated memory; on the CPU the storages of every tensor
        Python holds (RSS is no measure of what a few objects add: the allocator reuses freed pages)."""
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        import gc
        import warnings

        storages: dict[int, int] = {}
        with warnings.catch_warnings():  # isinstance() wakes deprecated torch module attributes
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


# -- timing generation -----------------------------------------------------------------------


@dataclass(frozen=True)
class GenRun:
    seconds: float  # the whole generate call
    first: float  # to the first new token: prefill and one step
    new_tokens: int

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed: the tokens after the first, over the time after the first."""
        return (self.new_tokens - 1) / max(self.seconds - self.first, 1e-9)


class _FirstToken:
    """A StoppingCriteria that notes when the first new token is there and never stops."""

    def __init__(self, device: torch.device, start: float) -> None:
        self.device, self.start = device, start
        self.at: float | None = None  # seconds to the first token, once it came

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.at is None:
            _sync(self.device)
            self.at = time.perf_counter() - self.start
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_once(model: CausalLM, ids: torch.Tensor, new_tokens: int) -> GenRun:
    """Greedy cached generation of exactly ``new_tokens`` tokens, timed."""
    from transformers import StoppingCriteriaList

    device = ids.device
    _sync(device)
    start = time.perf_counter()
    first = _FirstToken(device, start)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=PAD,
        stopping_criteria=StoppingCriteriaList([first]),
    )
    _sync(device)
    seconds = time.perf_counter() - start
    if out.shape[1] - ids.shape[1] != new_tokens:
        raise RuntimeError("generation stopped early")
    return GenRun(seconds, first.at if first.at is not None else seconds, new_tokens)


@dataclass
class Condition:
    """A state of the model to time generation in: ``enter`` sets it up, ``leave`` undoes it."""

    label: str
    enter: Callable[[], None] = lambda: None
    leave: Callable[[], None] = lambda: None
    runs: list[GenRun] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(r.tokens_per_s for r in self.runs)

    @property
    def first_token_s(self) -> float:
        return statistics.median(r.first for r in self.runs)


def interleaved(
    model: CausalLM,
    ids: torch.Tensor,
    new_tokens: int,
    conditions: Sequence[Condition],
    repeats: int,
    progress: Progress | None = None,
) -> None:
    """One warm-up run of each condition, then ``repeats`` rounds of one run of each."""
    total = (repeats + 1) * len(conditions)
    for r in range(repeats + 1):
        for j, cond in enumerate(conditions):
            cond.enter()
            try:
                run = generate_once(model, ids, new_tokens)
            finally:
                cond.leave()
            if r:  # round 0 warms kernels, the allocator and caches
                cond.runs.append(run)
            if progress:
                progress("timing generation", r * len(conditions) + j + 1, total)


def random_vectors(adapter: ArchAdapter, n: int, seed: int = 0, scale: float = 1e-3) -> list[Any]:
    """n small random steering vectors on every layer (their cost does not depend on their contents)."""
    from kedit.engine.steering import SteeringVector

    g = torch.Generator().manual_seed(seed)
    return [
        SteeringVector(
            {layer: torch.randn(adapter.hidden_size, generator=g) * scale for layer in range(adapter.n_layers)},
            adapter.model_type,
            adapter.hidden_size,
            "random",
            {},
        )
        for _ in range(n)
    ]


def racked(rack: Any, vectors: Sequence[Any], prefix: str = "bench") -> Condition:
    """A condition with ``vectors`` racked at strength 1."""
    names = [f"{prefix}-v{i}" for i in range(len(vectors))]

    def enter() -> None:
        for name, v in zip(names, vectors):
            rack.add(name, v, 1.0)

    def leave() -> None:
        for name in names:
            if name in rack.slots:
                rack.remove(name)

    return Condition(f"{len(vectors)} vector{'s' if len(vectors) != 1 else ''}", enter, leave)


def prompt_ids(model: CausalLM, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(4, vocab, (1, n), generator=g).to(next(model.parameters()).device)


@dataclass(frozen=True)
class Throughput:
    label: str
    layers: int
    new_tokens: int
    plain_tps: float  # median tokens/s, unsteered
    steered_tps: float  # median tokens/s, with the vectors racked

    @property
    def ratio(self) -> float:
        return self.steered_tps / self.plain_tps


def steering_throughput(
    model: CausalLM,
    label: str,
    n_vectors: int = 3,
    new_tokens: int = 64,
    prompt_tokens: int = 32,
    repeats: int = 3,
    progress: Any = None,
) -> Throughput:
    """Median tokens/s of greedy cached generation, plain vs ``n_vectors`` vectors on every layer."""
    from kedit.engine.steering import SteeringRack

    adapter = ArchAdapter.for_model(model)
    plain = Condition("plain")
    steered = racked(SteeringRack(model, adapter), random_vectors(adapter, n_vectors))
    interleaved(
        model,
        prompt_ids(model, prompt_tokens),
        new_tokens,
        [plain, steered],
        repeats,
        (lambda label_, done, total: progress(f"{label}: {label_}", done, total)) if progress else None,
    )
    return Throughput(label, adapter.n_layers, new_tokens, plain.tokens_per_s, steered.tokens_per_s)
