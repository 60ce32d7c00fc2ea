"""Reading a model's next-token log-probabilities only where a loss reads them, over rows that
a training loop runs many times (ROME's and MEMIT's values).

The vocabulary projection is the widest matmul of a small model's forward pass; a loop that reads
a few positions per row projects just those, and in one matmul for all groups of rows (on a CPU
that matmul is bound by reading the projection's weights, so one call costs about what one group's
did). Two ways to run the rows, with one interface:

- ``WholeRows``: each pass runs whole rows, padded per group; the blocks below the changed layer
  are replayed (kedit.engine.methods.replay).
- ``KeptPrefix``: each row is cut in two. The tokens before the cut are run once, without
  gradients, and kept as the attention cache; each pass runs only the rest of the row. A group's
  rows are packed into one sequence, with a mask that keeps them apart, rather than padded. That is
  exact when the change the loop optimises cannot reach the tokens before the cut (MEMIT adds
  δ at the subject's last token, and attention is causal). ROME's update reaches every token a
  little; kedit.engine.methods.rome.value.prefix_cuts bounds what is left out. Not with
  sliding-window attention, whose cache drops what slides out of the window (``keeps_prefix``).
  Passes after a group's first replay the blocks below the changed layer here too.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kedit.engine.methods.replay import Replayer, replay_below
from kedit.engine.metrics import pad_right


def head_log_probs(model, h: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities from final hidden states: the model's own vocabulary
    projection and logit cap (Gemma 2), in float32 from there."""
    logits = model.get_output_embeddings()(h).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


class Reads:
    """The (row, position) pairs whose next-token log-probabilities the loss reads."""

    def __init__(self) -> None:
        self.pairs: list[tuple[int, int]] = []

    def at(self, row: int, pos: int) -> int:
        self.pairs.append((row, pos))
        return len(self.pairs) - 1

    def first(self, row: int) -> int | None:
        """The earliest position read in ``row``; None if none is."""
        return min((p for r, p in self.pairs if r == row), default=None)


def keeps_prefix(model) -> bool:
    """Whether a prefix can be kept as an attention cache (KeptPrefix): not with sliding-window
    attention (a cache that drops what slides out of the window), and only with attention that
    takes a prepared mask (SDPA or eager), which packing rows needs."""
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return set(kinds) <= {"full_attention"}
    return not getattr(config, "sliding_window", None)


def _group_reads(reads: Reads, group: list[int], start: list[int], device) -> tuple[torch.Tensor, ...]:
    """For one group's pass, each row's tokens starting at ``start`` of the row: the reads'
    indices, and each read's row in the group and position in the tokens the pass runs."""
    local = {r: i for i, r in enumerate(group)}
    mine = [(k, local[r], p - start[local[r]]) for k, (r, p) in enumerate(reads.pairs) if r in local]
    if any(p < 0 for _, _, p in mine):
        raise ValueError("a read before its row's cut: the kept prefix would not see the change")
    return tuple(torch.tensor([m[i] for m in mine], dtype=torch.long, device=device) for i in range(3))


class _Runner:
    """Runs groups of rows; subclasses say how, and ``place`` where a row position lands."""

    def __init__(self, model, adapter, layer: int) -> None:
        self.model, self.adapter, self.layer = model, adapter, layer
        self.replayer: Replayer | None = None
        self.n_groups = 0

    @contextmanager
    def passes(self) -> Iterator[None]:
        """Open around the loop: passes after a group's first skip the blocks below ``layer``."""
        with replay_below(self.adapter, self.layer) as replayer:
            self.replayer = replayer
            try:
                yield
            finally:
                self.replayer = None

    def place(self, g: int, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the rows of group g have their positions ``pos`` in the tokens a pass runs:
        (row indices, positions), to place a change there."""
        raise NotImplementedError

    def hidden(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the final hidden states at group g's reads, those reads' indices in ``Reads.pairs``)."""
        raise NotImplementedError

    def run(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs at group g's reads, those reads' indices in ``Reads.pairs``)."""
        h, which = self.hidden(g)
        return self.head(h), which

    def log_probs(self) -> torch.Tensor:
        """(len(pairs), vocab): every group run, in the order the reads were added."""
        parts, order = zip(*(self.hidden(g) for g in range(self.n_groups)))
        return self.head(torch.cat(parts)[torch.argsort(torch.cat(order))])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return head_log_probs(self.model, h)

    def _final(self, g: int, **kwargs: Any) -> torch.Tensor:
        """The base model's last hidden states (after its final norm) for group g's pass."""
        if self.replayer is not None:
            self.replayer.batch(g)
        return self.model.base_model(**kwargs).last_hidden_state


class WholeRows(_Runner):
    """Each pass runs whole rows, each group padded to its own longest row."""

    def __init__(self, model, tok, rows, groups, reads: Reads, adapter=None, layer: int = 0) -> None:
        super().__init__(model, adapter, layer)
        device = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.plans: list[tuple[Any, ...]] = []
        for group in groups:
            ids, mask = pad_right([rows[r] for r in group], pad, device)
            self.plans.append((ids, mask, *_group_reads(reads, group, [0] * len(group), device)))
        self.n_groups = len(groups)

    def place(self, g: int, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(len(pos), device=pos.device), pos

    def hidden(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, which, at_row, at_pos = self.plans[g]
        h = self._final(g, input_ids=ids, attention_mask=mask)
        return h[at_row, at_pos], which


class KeptPrefix(_Runner):
    """Each row cut at ``cut[row]``: the tokens before it run once and are kept as the attention
    cache, and each pass runs the rest. Every read of a row must be at or after its cut. The same
    computation as whole rows, up to rounding, for any change that leaves the tokens before the
    cuts alone.

    A group's rows are packed into one sequence, the kept tokens and the rest alike, and a mask
    lets each token see only its own row's earlier tokens; positions count within each row. A
    pass then runs the group's tokens and no padding: the rows a value loop runs differ in
    length (a chat row's rest can be six times a plain row's), and padding them to the longest
    ran twice the tokens. Only with attention that takes such a mask (``keeps_prefix``).
    """

    def __init__(self, model, tok, rows, cut, groups, reads: Reads, adapter=None, layer: int = 0) -> None:
        super().__init__(model, adapter, layer)
        device = next(model.parameters()).device
        self.plans: list[tuple[Any, ...]] = []
        for group in groups:
            pre = [rows[r][: cut[r]] for r in group]
            suf = [rows[r][cut[r] :] for r in group]
            pre_ids, pre_pos, pre_row = _packed(pre, [0] * len(group), device)
            suf_ids, suf_pos, suf_row = _packed(suf, [len(p) for p in pre], device)
            cache = None
            if len(pre_ids):
                seen = (pre_row[:, None] == pre_row[None, :]) & (pre_pos[:, None] >= pre_pos[None, :])
                with torch.no_grad():
                    out = model(  # only the cache is kept: logits at one position
                        input_ids=pre_ids[None],
                        attention_mask=_mask(model, seen),
                        position_ids=pre_pos[None],
                        use_cache=True,
                        logits_to_keep=1,
                    )
                cache = out.cache
            own = suf_row[:, None] == suf_row[None, :]
            seen = torch.cat([suf_row[:, None] == pre_row[None, :], own & (suf_pos[:, None] >= suf_pos[None, :])], 1)
            # where each row's rest starts in the packed sequence
            offs = torch.tensor([sum(len(x) for x in suf[:i]) for i in range(len(group))], device=device)
            cuts = torch.tensor([cut[r] for r in group], device=device)
            which, at_row, at_pos = _group_reads(reads, group, cuts.tolist(), device)
            # a row position p sits at offs - cut + p
            start = offs - cuts
            at_pos = offs[at_row] + at_pos
            self.plans.append((suf_ids[None], _mask(model, seen), suf_pos[None], cache, which, at_pos, start))
        self.n_groups = len(groups)

    def place(self, g: int, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.plans[g][-1]
        return torch.zeros_like(start), start + pos

    def hidden(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, pos, cache, which, at_pos, _ = self.plans[g]
        past = copy.deepcopy(cache) if cache is not None else None  # a pass appends to the cache it is given
        h = self._final(g, input_ids=ids, attention_mask=mask, position_ids=pos, cache=past, use_cache=past is not None)
        return h[0, at_pos], which


def _packed(parts: list[list[int]], first: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token lists as one sequence: (ids, each token's position in its own row starting at
    ``first``, each token's row)."""
    ids = [t for p in parts for t in p]
    pos = [f + j for p, f in zip(parts, first) for j in range(len(p))]
    row = [i for i, p in enumerate(parts) for _ in p]
    return tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (ids, pos, row))  # type: ignore[return-value]


def _mask(model, seen: torch.Tensor) -> torch.Tensor:
    """A (query, key) boolean matrix, True where a token may attend, as the model's attention
    takes a prepared mask: boolean for SDPA, additive for eager attention."""
    if model.config._attn_implementation == "eager":
        dtype = model.dtype
        zero = torch.zeros((), dtype=dtype, device=seen.device)
        return torch.where(seen, zero, torch.finfo(dtype).min)[None, None]
    return seen[None, None]
