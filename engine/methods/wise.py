"""WISE (Wang et al. 2024): edits go to a side copy of one MLP output projection, and a
router sends each input either to it or to the untouched main memory.

The side memory is W' = W + D, kept as the difference D (so a 4-bit or 8-bit W is never
touched or dequantized): at a position with input x the side output is W x + D x, and the
activation score of the paper, Δ_act(x) = ‖(W' − W) x‖, is ‖D x‖.

Routing. A position goes to the side memory when ‖D x‖ is above a threshold taken from
the edits: act_ratio × the lowest score any edit's own positions reached when it was
made. Routing is decided per position from the call's own input, so cached decoding
needs no state carried between calls.

Training one edit, with the model frozen, optimises a change Δ of the side memory:
  NLL of the target, with the side memory in force at the edit's positions
  + ReLU(‖D x_i‖ − α)         on irrelevant text (it must stay in the main memory),
                              averaged over the positions that break the margin
  + ReLU(β − ‖D x_e‖)         on the edit's positions (they must reach the side memory)
  + ReLU(γ − (mean ‖D x_e‖ − mean ‖D x_i‖))   (the two must stay apart)
  + ReLU(‖D x_o‖ − old_share · min ‖D x_e‖)    on the inputs of edits other side memories
                              hold (see WiseMemory), so this one does not claim them
(the first three are the paper's margin losses, α < β), with every entry of D kept within
±norm_constraint.

Knowledge sharding. The side memory has n_shards shards; shard i owns a fixed random
mask M_i covering mask_ratio of D's entries, and edits take turns on the shards. An edit
only changes its shard's masked entries (its gradient is masked). Each shard's delta τ_i
is the sum of its edits' changes, and D = TIES-merge(τ_1 … τ_k): trim each τ to its
largest ties_density share, elect each entry's sign by the sum, and average the τ that
agree with it (the disjoint mean).

Rollback. Each edit keeps its own change (the masked entries only) and its score.
Removing an edit recomputes its shard's sum of the remaining changes in the same order,
then the merge and the threshold. So rolling back the latest edit restores D and the
threshold bit for bit. Rolling back an earlier one removes exactly its recorded change;
the later edits keep theirs, though they were trained with it present, so D is the sum
of what the others recorded, not what training without the removed edit would have
given. With no edits left the hook is removed and the module is exactly as loaded.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kedit.engine.methods import EditRequest, MethodParams
from kedit.engine.merging import ties_merge
from kedit.engine.metrics import encode_pair, pad_right
from kedit.engine.methods.rome.value import frozen
from kedit.engine.methods.upper import from_layer
from kedit.engine.patches import TogglePatch, all_attached, attached


@dataclass(frozen=True)
class WiseParams(MethodParams):
    section = "wise"
    layer: int | None = None  # None: layer_share of the way up the stack
    layer_share: float = 0.85  # the paper edits a mid-to-late layer (Llama-2-7B: 27 of 32)
    n_iter: int = 70
    lr: float = 1.0  # plain SGD, as published: gradients on weights are small
    weight_decay: float = 1e-5
    optimizer: str = "sgd"  # or "adam"
    nll_stop: float = 0.01
    margin_stop: float = 0.01  # stop once the NLL and the margin losses are both this small
    mask_ratio: float = 0.2  # share of D's entries each shard may change
    n_shards: int = 2
    ties_density: float = 1.0  # share of each shard's entries TIES keeps (1: no trimming)
    act_ratio: float = 0.88  # threshold = act_ratio × the lowest edit score
    alpha: float = 5.0  # irrelevant positions stay below
    beta: float = 20.0  # edit positions get above
    gamma: float = 10.0  # and the two means stay this far apart
    norm_constraint: float = 1.0  # |D| entries at most this
    n_irrelevant: int = 8  # model-written texts used as irrelevant inputs
    irrelevant_tokens: int = 16
    seed: int = 0  # for the shard masks
    edits_per_memory: int = 1000  # then a new side memory opens (WISE-Retrieve)
    old_share: float = 0.5  # a new side memory scores older edits' inputs below this share of its own


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
        self.shards = [Shard((torch.rand(shape, generator=gen) < hp.mask_ratio).to(device))
                       for _ in range(hp.n_shards)]
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

    def add(self, edit_id: str, shard: int, values: torch.Tensor, edit_inputs: torch.Tensor,
            score: float | None = None) -> None:
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

    def __init__(self, module: nn.Module, name: str, shape: tuple[int, int], device: torch.device,
                 dtype: torch.dtype, hp: WiseParams) -> None:
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
    def bypassed(self):
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
            side = x.to(bank.d_compute.dtype) @ bank.d_compute.T
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
            thresholds = torch.tensor([b.threshold for b in live], device=live[0].d_compute.device)
            self._stack = (key, torch.cat([b.d_compute for b in live]), thresholds)
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

    def add(self, edit_id: str, bank: int, shard: int, values: torch.Tensor, edit_inputs: torch.Tensor,
            score: float | None = None) -> None:
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
        return {"module": self.name, "side memories": len(self.banks),
                "edits per shard": [[len(s.changes) for s in b.shards] for b in self.banks],
                "thresholds": [b.threshold for b in self.banks],
                "D nonzero share": [float((b.d != 0).float().mean()) for b in self.banks],
                "routed share": self.routed / self.positions if self.positions else None}


def memory(model: nn.Module, module: nn.Module, name: str, shape: tuple[int, int],
           dtype: torch.dtype, hp: WiseParams) -> WiseMemory:
    device = next(model.parameters()).device
    return attached(model, "wise", name, lambda: WiseMemory(module, name, shape, device, dtype, hp))


def memories(model: nn.Module) -> dict[str, WiseMemory]:
    return all_attached(model, "wise")


class WisePatch(TogglePatch):
    """One edit's change on one shard of one side memory."""

    def __init__(self, mem: WiseMemory, edit_id: str, bank: int, shard: int, values: torch.Tensor,
                 edit_inputs: torch.Tensor, score: float | None = None) -> None:
        self.mem, self.key, self.bank, self.shard = mem, edit_id, bank, shard
        self.values, self.edit_inputs = values, edit_inputs
        self.score = score  # recorded when first applied, so a reload routes exactly as before

    def _apply(self) -> None:
        self.mem.add(self.key, self.bank, self.shard, self.values, self.edit_inputs, self.score)
        self.score = self.mem.banks[self.bank].scores[self.key]

    def _revert(self) -> None:
        self.mem.remove(self.key)


# -- computing an edit -----------------------------------------------------------------


@torch.no_grad()
def _inputs(model, tokenizer, module, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's inputs (B, T, in) for right-padded rows, and the mask (B, T)."""
    from kedit.engine.methods.rome.key import capture_io

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = pad_right(rows, pad, next(model.parameters()).device)
    with capture_io(module) as seen:
        model(input_ids=ids, attention_mask=mask)
    return seen["input"].float(), mask.bool()


def apply_wise(handle, request: EditRequest, hp: WiseParams, layer: int, edit_id: str,
               irrelevant: Sequence[str],
               progress: Callable[[str, int, int], None] | None = None) -> tuple[WisePatch, dict[str, Any]]:
    """The edit's change of the side memory (not yet applied); the model is left untouched."""
    from kedit.engine.methods.rome.key import capture_io

    model, tok, adapter = handle.model, handle.tokenizer, handle.adapter
    module, name = adapter.mlp_out(layer), adapter.mlp_out_name(layer)
    device = next(model.parameters()).device
    prompt_ids, target_ids = encode_pair(tok, request.prompt, request.target)
    ids = torch.tensor([prompt_ids + target_ids[:-1]], device=device)
    start = len(prompt_ids) - 1
    edit_pos = torch.arange(start, start + len(target_ids), device=device)
    tgt = torch.tensor(target_ids, device=device)
    at = torch.arange(len(target_ids), device=device)  # the target's places among the kept logits

    with torch.no_grad(), capture_io(module) as seen:
        model(input_ids=ids)
    x_edit = seen["input"][0, edit_pos].float()  # (n_target, in): independent of the side memory
    out_dim = seen["output"].shape[-1]
    dtype = seen["output"].dtype
    x_irr, irr_mask = _inputs(model, tok, module, [tok(t)["input_ids"] for t in irrelevant])
    x_irr = x_irr[irr_mask]  # (n, in)

    mem = memory(model, module, name, (out_dim, x_edit.shape[-1]), dtype, hp)
    bank_i = mem.bank_for_new()
    bank = mem.bank(bank_i)
    others = mem.other_inputs(bank_i)  # edits the other side memories hold must stay out of this one
    x_old = others.to(x_irr.device) if others is not None else x_irr[:0]
    shard = bank.next_shard()
    mask = bank.shards[shard].mask
    own = bank.shards[shard].tau
    change = torch.zeros_like(own, requires_grad=True)
    opt = (torch.optim.Adam([change], lr=hp.lr) if hp.optimizer == "adam"
           else torch.optim.SGD([change], lr=hp.lr, weight_decay=hp.weight_decay))
    c = hp.norm_constraint
    taus = [sh.tau for sh in bank.shards]

    def side_weight() -> torch.Tensor:  # D as the merge will make it with this change in
        return ties_merge([t + change * mask if j == shard else t for j, t in enumerate(taus)],
                          hp.ties_density, [mask if j == shard else None for j in range(len(taus))])

    at_edit = torch.zeros(ids.shape[1], 1, device=device)
    at_edit[edit_pos] = 1.0

    def hook(mod, args, output):  # the side memory where the router will send this edit: its positions
        return output + (at_edit * (args[0].float() @ side_weight().T)).to(output.dtype)

    first = nll = margin = float("nan")
    steps = 0
    with frozen(model), mem.bypassed(), from_layer(adapter, layer):
        handle_ = module.register_forward_hook(hook)
        try:
            for step in range(hp.n_iter + 1):
                # the edit's positions are the last len(target) ones: logits there only
                logits = model(input_ids=ids, logits_to_keep=len(target_ids)).logits[0].float()
                loss_nll = -torch.log_softmax(logits, dim=-1)[at, tgt].mean()
                d = side_weight()
                s_edit = torch.linalg.vector_norm(x_edit @ d.T, dim=-1)
                s_irr = torch.linalg.vector_norm(x_irr @ d.T, dim=-1)
                s_old = torch.linalg.vector_norm(x_old @ d.T, dim=-1)
                over = torch.relu(s_irr - hp.alpha)  # averaged over the positions that break it
                loss_margin = (over.sum() / (over > 0).sum().clamp(min=1) + torch.relu(hp.beta - s_edit).mean()
                               + torch.relu(hp.gamma - (s_edit.mean() - s_irr.mean()))
                               + torch.relu(s_old - hp.old_share * s_edit.min()).sum())
                nll, margin = float(loss_nll.detach()), float(loss_margin.detach())
                first = nll if step == 0 else first
                if progress:
                    progress("training the WISE side memory", step, hp.n_iter)
                if (nll < hp.nll_stop and margin < hp.margin_stop) or step == hp.n_iter:
                    break
                opt.zero_grad()
                (loss_nll + loss_margin).backward()
                opt.step()
                steps += 1
                with torch.no_grad():  # |τ + change| ≤ c, so every entry of the merged D is too
                    change.copy_(torch.clamp(own + change, -c, c) - own)
                if not torch.isfinite(change).all():
                    raise FloatingPointError("the WISE side memory became NaN or infinite")
        finally:
            handle_.remove()
    values = (change.detach() * mask)[mask]
    info = {"layer": layer, "module": name, "memory": bank_i, "shard": shard, "nll_before": first, "nll_after": nll,
            "margin_loss": margin, "value_steps": steps}
    return WisePatch(mem, edit_id, bank_i, shard, values, x_edit), info
