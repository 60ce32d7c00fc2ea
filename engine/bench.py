"""Benchmarks: speed figures measured as ratios within one run, never asserted in tests.

``steering_throughput`` times greedy generation with a full KV cache, unsteered and with
vectors racked on every layer, interleaving the two so drift on a noisy machine hits both.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from kedit.engine.arch import ArchAdapter
from kedit.engine.errors import KeditError


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


def random_model(shape: dict[str, Any], n_layers: int | None = None, dtype: str = "float32",
                 device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """A random-weight causal LM with a real model's dimensions (kedit.toml [shapes])."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(shape)
    model_type = shape.pop("model_type", None)
    if model_type is None:
        raise KeditError("a shape needs its model_type")
    if n_layers is not None:
        shape["num_hidden_layers"] = int(n_layers)
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **shape)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def steering_throughput(model: torch.nn.Module, label: str, n_vectors: int = 3, new_tokens: int = 64,
                        prompt_tokens: int = 32, repeats: int = 3, progress: Any = None) -> Throughput:
    """Median tokens/s of greedy cached generation, plain vs ``n_vectors`` vectors on every layer."""
    from kedit.engine.steering import SteeringRack, SteeringVector

    adapter = ArchAdapter.for_model(model)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(4, vocab, (1, prompt_tokens), generator=g).to(device)
    rack = SteeringRack(model, adapter)
    hidden = adapter.hidden_size
    vectors = [SteeringVector({layer: torch.randn(hidden, generator=g) * 1e-3 for layer in range(adapter.n_layers)},
                              adapter.model_type, hidden, "random", {}) for _ in range(n_vectors)]

    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
        _sync(device)
        seconds = time.perf_counter() - start
        if out.shape[1] - ids.shape[1] != new_tokens:
            raise RuntimeError("generation stopped early")
        return new_tokens / seconds

    def steered() -> float:
        for i, v in enumerate(vectors):
            rack.add(f"v{i}", v, 1.0)
        try:
            with rack.generating(ids.shape[1]):
                return run()
        finally:
            for i in range(n_vectors):
                rack.remove(f"v{i}")

    run(), steered()  # warm-up: kernels, allocator, caches
    plain, with_vectors = [], []
    for r in range(repeats):
        plain.append(run())
        with_vectors.append(steered())
        if progress is not None:
            progress(f"{label}: timing", r + 1, repeats)
    return Throughput(label, adapter.n_layers, new_tokens, statistics.median(plain), statistics.median(with_vectors))
