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

A loop that alternates between several fixed batches names the one it is about to run with
``Replayer.batch(key)``; each batch keeps its own output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


class Replayer:
    """The kept outputs, one per named batch, and the batch the next pass runs."""

    def __init__(self) -> None:
        self.kept: dict[Any, dict[str, Any]] = {}
        self.current: Any = 0

    def batch(self, key: Any) -> None:
        """The next passes run the batch named ``key`` (the first pass of each runs whole)."""
        self.current = key

    def slot(self) -> dict[str, Any]:
        return self.kept.setdefault(self.current, {})


class _Replay(nn.Module):
    """Stands in for a decoder block below L: the first pass runs the block, later ones replay."""

    block: nn.Module  # set with object.__setattr__ in __init__, so not registered as a submodule

    def __init__(self, block: nn.Module, replayer: Replayer, index: int, last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)  # not a submodule: no second set of parameters
        self.replayer, self.index, self.last = replayer, index, last
        if hasattr(block, "attention_type"):  # the model's loop picks each block's mask by it
            self.attention_type = block.attention_type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        kept = self.replayer.slot()
        if self.index == 0:
            if "shape" not in kept:
                kept["shape"] = hidden.shape
            elif hidden.shape != kept["shape"]:
                raise RuntimeError("replay_below replays fixed batches: a batch's every pass must have the same input")
        if "output" in kept:
            return kept["output"]
        out = self.block(*args, **kwargs)
        if self.last:
            kept["output"] = out
        return out


@contextmanager
def replay_below(adapter: Any, layer: int) -> Iterator[Replayer]:
    """While open, forward passes after the first recompute only blocks ``layer`` and up.

    Every pass of one batch must use the same input ids and mask; a loop over several
    batches names each with the yielded ``Replayer.batch``. With no ``adapter`` every pass
    runs whole.
    """
    replayer = Replayer()
    if adapter is None or layer <= 0:
        yield replayer
        return
    blocks = adapter.layers()
    originals = [blocks[i] for i in range(layer)]
    for i, block in enumerate(originals):
        blocks[i] = _Replay(block, replayer, i, i == layer - 1)
    try:
        yield replayer
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
