"""WISE's side memories: shards, their TIES merge, the activation-score router, and the patch.

See kedit.engine.methods.wise for the method.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from kedit.engine.merging import ties_merge
from kedit.engine.methods.wise.params import WiseParams
from kedit.engine.patches import TogglePatch, all_attached, attached


class Shard:
    """A shard's edits and τ, their sum: always summed from zero in the order the edits came, so
    adding an edit (one addition) and removing one (summing the rest again) give the same bits
    as summing the remaining edits from scratch."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask  # bool (out, in)
        self.changes: OrderedDict[str, torch.Tensor] = OrderedDict()  # edit id -> values at mask
        self.tau = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)

    def add(self, edit_id: str, values: torch.Tensor) -> None:
        self.changes[edit_id] = values
        values = values.to(self.tau.device)
        base = self.tau[self.mask] if len(self.changes) > 1 else torch.zeros_like(values)
        self.tau[self.mask] = base + values

    def remove(self, edit_id: str) -> bool:
        if self.changes.pop(edit_id, None) is None:
            return False
        total = torch.zeros(int(self.mask.sum()), dtype=torch.float32, device=self.tau.device)
        for values in self.changes.values():
            total = total + values.to(total.device)
        self.tau[self.mask] = total
        return True


_MERGES = itertools.count()  # numbers every merge of every side memory: a stacked copy knows it is stale


class Bank:
    """One side memory: its shards, their merge D, and the edits it holds."""

    def __init__(self, shape: tuple[int, int], device: torch.device, dtype: torch.dtype, hp: WiseParams) -> None:
        self.hp, self.dtype = hp, dtype
        gen = torch.Generator().manual_seed(hp.seed)
        self.shards = [Shard((torch.rand(shape, generator=gen) < hp.mask_ratio).to(device)) for _ in range(hp.n_shards)]
        self.d = torch.zeros(shape, dtype=torch.float32, device=device)
        self.d_compute: torch.Tensor | None = None
        self.scores: OrderedDict[str, float] = OrderedDict()  # each edit's own score when made
        self.inputs: OrderedDict[str, torch.Tensor] = OrderedDict()  # each edit's module inputs
        self.threshold = float("inf")
        self.version = next(_MERGES)

    @property
    def full(self) -> bool:
        return len(self.scores) >= self.hp.edits_per_memory

    def next_shard(self) -> int:
        """Edits take turns: the shard holding the fewest."""
        return min(range(len(self.shards)), key=lambda i: len(self.shards[i].changes))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """‖D x‖ for each row of x (..., in)."""
        return torch.linalg.vector_norm(x.float() @ self.d.T, dim=-1)

    def merge(self) -> None:
        """D from the shards' τ."""
        self.version = next(_MERGES)
        if not self.scores:
            self.d.zero_()
            self.d_compute, self.threshold = None, float("inf")
            return
        self.d = ties_merge([s.tau for s in self.shards], self.hp.ties_density)
        self.d_compute = self.d.to(self.dtype)

    def add(
        self, edit_id: str, shard: int, values: torch.Tensor, edit_inputs: torch.Tensor, score: float | None = None
    ) -> None:
        """Add an edit; its score is measured now unless given (a loaded session's record)."""
        self.shards[shard].add(edit_id, values)
        self.scores[edit_id] = float("inf")
        self.inputs[edit_id] = edit_inputs
        self.merge()
        self.scores[edit_id] = float(self.score(edit_inputs).min()) if score is None else score
        self.threshold = self.hp.act_ratio * min(self.scores.values())

    def remove(self, edit_id: str) -> bool:
        if edit_id not in self.scores:
            return False
        for shard in self.shards:
            shard.remove(edit_id)
        del self.scores[edit_id], self.inputs[edit_id]
        self.merge()
        if self.scores:
            self.threshold = self.hp.act_ratio * min(self.scores.values())
        return True


class WiseMemory:
    """The side memories on one module, as one forward hook; one per edited module.

    A side memory holds up to edits_per_memory edits; then a new one is opened (the
    paper's WISE-Retrieve). Where the paper retrieves the most activated memory, here
    the newest memory whose score at a position passes its threshold takes it: each new
    memory is trained to stay below α on the inputs of the edits the older ones hold,
    so it does not claim them, while an older memory was never told about newer edits.
    Positions no memory claims stay with the main memory.
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        shape: tuple[int, int],
        device: torch.device,
        dtype: torch.dtype,
        hp: WiseParams,
    ) -> None:
        self.module, self.name, self.shape, self.device, self.dtype = module, name, shape, device, dtype
        self.hp = hp
        self.banks: list[Bank] = []
        self._handle: Any = None
        self._bypass = False
        self._stack: tuple[tuple, torch.Tensor, torch.Tensor] | None = None
        self.positions = 0
        self.routed = 0

    @property
    def scores(self) -> dict[str, float]:
        return {k: v for b in self.banks for k, v in b.scores.items()}

    def bank_for_new(self) -> int:
        """The first side memory with room; len(banks) means a new one."""
        for i, bank in enumerate(self.banks):
            if not bank.full:
                return i
        return len(self.banks)

    def bank(self, i: int) -> Bank:
        """Side memory i, opened empty if need be (an empty one changes nothing)."""
        while len(self.banks) <= i:
            self.banks.append(Bank(self.shape, self.device, self.dtype, self.hp))
        return self.banks[i]

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """The hook passes outputs through unchanged (while an edit trains its own side weight)."""
        self._bypass = True
        try:
            yield
        finally:
            self._bypass = False

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        live = [b for b in self.banks if b.d_compute is not None]
        if self._bypass or not live:
            return output
        x = args[0]
        if len(live) == 1:
            bank = live[0]
            d = cast(torch.Tensor, bank.d_compute)  # live banks have their merge
            side = x.to(d.dtype) @ d.T
            claim = torch.linalg.vector_norm(side.float(), dim=-1) > bank.threshold
            n = int(claim.sum())
            self.positions += claim.numel()
            self.routed += n
            return output + (side * claim[..., None]).to(output.dtype) if n else output
        # several side memories: every one's output in one product, then the newest that
        # claims a position answers there
        stack, thresholds = self._stacked(live)
        k, out_dim = len(live), stack.shape[0] // len(live)
        side = (x.to(stack.dtype) @ stack.T).unflatten(-1, (k, out_dim))  # (..., k, out)
        claim = torch.linalg.vector_norm(side.float(), dim=-1) > thresholds  # (..., k)
        newest = k - 1 - claim.flip(-1).int().argmax(-1)  # (...,): the newest claiming memory
        routed = claim.any(-1)
        n = int(routed.sum())
        self.positions += routed.numel()
        self.routed += n
        if not n:
            return output
        chosen = torch.gather(side, -2, newest[..., None, None].expand(*newest.shape, 1, out_dim)).squeeze(-2)
        return output + (chosen * routed[..., None]).to(output.dtype)

    def _stacked(self, live: list[Bank]) -> tuple[torch.Tensor, torch.Tensor]:
        """The live side memories' D stacked (k·out, in), and their thresholds; rebuilt on change."""
        key = tuple((b.version, b.threshold) for b in live)
        if self._stack is None or self._stack[0] != key:
            merged = [cast(torch.Tensor, b.d_compute) for b in live]  # live banks have their merge
            thresholds = torch.tensor([b.threshold for b in live], device=merged[0].device)
            self._stack = (key, torch.cat(merged), thresholds)
        return self._stack[1], self._stack[2]

    def _sync_hook(self) -> None:
        while self.banks and not self.banks[-1].scores:
            self.banks.pop()
        if any(b.scores for b in self.banks):
            if self._handle is None:
                self._handle = self.module.register_forward_hook(self._hook)
        elif self._handle is not None:
            self._handle.remove()
            self._handle = None

    def add(
        self,
        edit_id: str,
        bank: int,
        shard: int,
        values: torch.Tensor,
        edit_inputs: torch.Tensor,
        score: float | None = None,
    ) -> None:
        self.bank(bank).add(edit_id, shard, values, edit_inputs, score)
        self._sync_hook()

    def remove(self, edit_id: str) -> None:
        for bank in self.banks:
            if bank.remove(edit_id):
                break
        self._sync_hook()

    def other_inputs(self, bank: int) -> torch.Tensor | None:
        """The module inputs of the edits held by the other side memories."""
        xs = [x for i, b in enumerate(self.banks) if i != bank for x in b.inputs.values()]
        return torch.cat(xs) if xs else None

    def state(self) -> dict[str, Any]:
        return {
            "module": self.name,
            "side memories": len(self.banks),
            "edits per shard": [[len(s.changes) for s in b.shards] for b in self.banks],
            "thresholds": [b.threshold for b in self.banks],
            "D nonzero share": [float((b.d != 0).float().mean()) for b in self.banks],
            "routed share": self.routed / self.positions if self.positions else None,
        }


def memory(
    model: nn.Module, module: nn.Module, name: str, shape: tuple[int, int], dtype: torch.dtype, hp: WiseParams
) -> WiseMemory:
    device = next(model.parameters()).device
    return attached(model, "wise", name, lambda: WiseMemory(module, name, shape, device, dtype, hp))


def memories(model: nn.Module) -> dict[str, WiseMemory]:
    return all_attached(model, "wise")


class WisePatch(TogglePatch):
    """One edit's change on one shard of one side memory."""

    def __init__(
        self,
        mem: WiseMemory,
        edit_id: str,
        bank: int,
        shard: int,
        values: torch.Tensor,
        edit_inputs: torch.Tensor,
        score: float | None = None,
    ) -> None:
        self.mem, self.key, self.bank, self.shard = mem, edit_id, bank, shard
        self.values, self.edit_inputs = values, edit_inputs
        self.score = score  # recorded when first applied, so a reload routes exactly as before

    def _apply(self) -> None:
        self.mem.add(self.key, self.bank, self.shard, self.values, self.edit_inputs, self.score)
        self.score = self.mem.banks[self.bank].scores[self.key]

    def _revert(self) -> None:
        self.mem.remove(self.key)
