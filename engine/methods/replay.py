"""Training loops that change one layer need only the layers from it up.

ROME's value, GRACE's value and WISE's side memory are each optimised by running the same
batch through the frozen model many times, with a change at decoder block L. Nothing
below block L depends on that change: every block under L gets the same input on every
pass and gives the same output. ``replay_below`` runs the first pass whole, keeps block
L-1's output, and on later passes the blocks below L hand that output straight back
instead of recomputing it. The result is exact, not an approximation: block L receives
the very tensor it received on the first pass, so every later pass computes what a full
pass would (tests compare the optimised values with ``torch.equal``).

Hooks on the blocks below L (a steering vector, another edit) ran on the first pass and
are part of the kept output; they do not run again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


class _Replay(nn.Module):
    """Stands in for a decoder block below L: the first pass runs the block, later ones replay."""

    block: nn.Module  # set with object.__setattr__ in __init__, so not registered as a submodule

    def __init__(self, block: nn.Module, kept: dict[str, Any], index: int, last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)  # not a submodule: no second set of parameters
        self.kept, self.index, self.last = kept, index, last
        if hasattr(block, "attention_type"):  # the model's loop picks each block's mask by it
            self.attention_type = block.attention_type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.index == 0:
            if "shape" not in self.kept:
                self.kept["shape"] = hidden.shape
            elif hidden.shape != self.kept["shape"]:
                raise RuntimeError("replay_below replays one batch: every pass must have the same input")
        if "output" in self.kept:
            return self.kept["output"]
        out = self.block(*args, **kwargs)
        if self.last:
            self.kept["output"] = out
        return out


@contextmanager
def replay_below(adapter: Any, layer: int) -> Iterator[None]:
    """While open, forward passes after the first recompute only blocks ``layer`` and up.

    Every pass inside must use the same input ids and mask. With no ``adapter`` every pass
    runs whole.
    """
    if adapter is None or layer <= 0:
        yield
        return
    blocks = adapter.layers()
    originals = [blocks[i] for i in range(layer)]
    kept: dict[str, Any] = {}
    for i, block in enumerate(originals):
        blocks[i] = _Replay(block, kept, i, i == layer - 1)
    try:
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
