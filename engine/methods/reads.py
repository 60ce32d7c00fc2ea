"""Reading a model's next-token log-probabilities only where a loss reads them.

The vocabulary projection is the widest matmul of a small model's forward pass; a training loop
that reads a few positions per row (ROME's and MEMIT's values) keeps logits at just those.
"""

from __future__ import annotations

import torch

from kedit.engine.methods.replay import Replayer
from kedit.engine.metrics import pad_right


class Reads:
    """The (row, position) pairs whose next-token log-probabilities the loss reads, and how to
    compute just those: one forward pass per group of rows, each padded to its own longest row,
    keeping logits only at the positions read (the vocabulary projection is the widest matmul)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[int, int]] = []

    def at(self, row: int, pos: int) -> int:
        self.pairs.append((row, pos))
        return len(self.pairs) - 1

    def plan(self, groups: list[list[int]], rows: list[list[int]], tokenizer, device) -> list[tuple]:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out = []
        for group in groups:
            local = {r: i for i, r in enumerate(group)}
            mine = [(k, local[r], p) for k, (r, p) in enumerate(self.pairs) if r in local]
            ids, mask = pad_right([rows[r] for r in group], pad, device)
            keep = torch.tensor(sorted({p for _, _, p in mine}), dtype=torch.long, device=device)
            slot = torch.full((ids.shape[1],), -1, dtype=torch.long, device=device)
            slot[keep] = torch.arange(len(keep), device=device)
            which = torch.tensor([k for k, _, _ in mine], dtype=torch.long, device=device)
            at_row = torch.tensor([r for _, r, _ in mine], dtype=torch.long, device=device)
            at_pos = slot[torch.tensor([p for _, _, p in mine], dtype=torch.long, device=device)]
            out.append((ids, mask, keep, which, at_row, at_pos))
        return out

    def log_probs(self, model, plan: list[tuple], replayer: Replayer | None = None) -> torch.Tensor:
        """(len(pairs), vocab): log-softmax of the next token at each pair, in the order added."""
        parts, order = [], []
        for g, (ids, mask, keep, which, at_row, at_pos) in enumerate(plan):
            if replayer is not None:
                replayer.batch(g)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float()
            parts.append(torch.log_softmax(logits[at_row, at_pos], dim=-1))
            order.append(which)
        flat = torch.cat(parts)
        return flat[torch.argsort(torch.cat(order))]
