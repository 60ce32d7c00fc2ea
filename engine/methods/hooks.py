"""Hooks that several methods use while they compute an edit."""

from __future__ import annotations

from contextlib import contextmanager

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


@contextmanager
def capture_io(module: torch.nn.Module):
    """Record a module's input and output on every forward call."""
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, args, output):
        seen["input"] = args[0]
        seen["output"] = output

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
