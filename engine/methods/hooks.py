"""Hooks that several methods use while they compute an edit."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def frozen(model: torch.nn.Module):
    """Parameters stop requiring grad for the duration; restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Reached(Exception):
    """Raised from a hook to end a forward pass at the module it watches."""


def run_until(model: Any, module: torch.nn.Module, **inputs: Any) -> dict[str, torch.Tensor]:
    """The module's first input and its output for a forward pass of ``model`` on ``inputs``; the
    pass ends there, so the blocks above the module and the vocabulary projection never run."""
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, args, output):
        seen["input"], seen["output"] = args[0], output
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        model.base_model(**inputs, use_cache=False)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("the forward pass did not reach the module")
    return seen
