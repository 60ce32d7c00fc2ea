"""z = h + δ for each fact: the residual stream at the top layer L at the subject's last token
that makes the model say the target (MEMIT's ``compute_z``), found by gradient descent with the
model frozen.

For each unit, loss = mean NLL of the target after the prompt under each context template
                    + kl_factor · KL(P_before ‖ P_now) of the next token after "{subject} is a"
                    + v_weight_decay · ‖δ‖ / ‖h‖²   (the reference code's form),
with δ added to block L's output at the subject's last token of each of the fact's rows, and
‖δ‖ clamped to clamp_norm_factor · ‖h‖ after each step (h: block L's output on the bare prompt).

Facts whose prompts share the words up to the subject's last token have the same key at every
layer, so one update cannot give them different values: they form one unit with one δ, optimised
on all of their targets (three facts about one person: one z that says all three). MEMIT's
paper has one fact per subject and one z per fact, which is the same thing there.

The units are optimised together: each unit's loss reads only its own δ, and Adam's update is
per coordinate, so this is the same as optimising them one by one, in fewer passes. A unit stops
(its δ is kept) once its NLL is below ``nll_stop``; a group of rows whose units have all stopped
is no longer run. The forward and backward pass of each group is done before the next group's, so
memory holds one group.

Tokens before δ's position never see δ (attention is causal): where the model's attention cache
allows it, they are run once and kept (``_KeptPrefix``), and each pass runs only the rest of each
row, which on SmolLM2-135M made the values 2.5 times as fast. With sliding-window attention (the
fact world) whole rows are run, with the blocks below L replayed (kedit.engine.methods.replay).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kedit.engine.methods.base import EditRequest
from kedit.engine.methods.hooks import frozen
from kedit.engine.methods.memit.params import MemitParams
from kedit.engine.methods.reads import Reads
from kedit.engine.methods.replay import replay_below
from kedit.engine.subject import subject_last_token


@dataclass
class Targets:
    z: torch.Tensor  # (units, d): the residual stream each unit's subject should have at L
    h: torch.Tensor  # (units, d): what it has before the edit
    nll_before: torch.Tensor  # (units,)
    nll_after: torch.Tensor  # (units,)
    steps: int  # optimisation steps taken (the slowest unit's)


class _WholeRows:
    """Each pass runs whole rows; the blocks below L are replayed (kedit.engine.methods.replay)."""

    def __init__(self, model, tok, rows, at, groups, reads: Reads, adapter, layer: int) -> None:
        device = next(model.parameters()).device
        self.model, self.adapter, self.layer = model, adapter, layer
        self.plan = reads.plan(groups, rows, tok, device)
        self.positions = [torch.tensor([at[r] for r in group], device=device) for group in groups]

    @contextmanager
    def passes(self) -> Iterator[None]:
        with replay_below(self.adapter, self.layer) as replayer:
            self.replayer = replayer
            yield

    def where(self, g: int) -> torch.Tensor:
        """Where δ goes in each row of group g, in the tokens a pass runs."""
        return self.positions[g]

    def run(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs at the group's reads, those reads' indices)."""
        ids, mask, keep, which, at_row, at_pos = self.plan[g]
        self.replayer.batch(g)
        logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float()
        return torch.log_softmax(logits[at_row, at_pos], dim=-1), which


class _KeptPrefix:
    """Each row split where δ goes: the tokens before it never see δ (attention is causal), so
    they are run once, without gradients, and kept as the attention cache; each pass runs only
    the rest of the row (for a fact about a person: about 3 tokens of 15). The same
    computation as whole rows, up to rounding."""

    def __init__(self, model, tok, rows, at, groups, reads: Reads) -> None:
        device = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.model = model
        self.plans = []
        for group in groups:
            pre = [rows[r][: at[r]] for r in group]
            suf = [rows[r][at[r] :] for r in group]
            n, lp, ls = len(group), max(len(p) for p in pre), max(len(x) for x in suf)
            pre_ids = torch.full((n, lp), pad, dtype=torch.long, device=device)
            pre_mask = torch.zeros((n, lp), dtype=torch.long, device=device)
            pre_pos = torch.zeros((n, lp), dtype=torch.long, device=device)
            suf_ids = torch.full((n, ls), pad, dtype=torch.long, device=device)
            suf_mask = torch.zeros((n, ls), dtype=torch.long, device=device)
            suf_pos = torch.zeros((n, ls), dtype=torch.long, device=device)
            for i, (p, x) in enumerate(zip(pre, suf)):
                if p:  # the prefix sits at the right end, next to its row's rest
                    pre_ids[i, lp - len(p) :] = torch.tensor(p, device=device)
                    pre_mask[i, lp - len(p) :] = 1
                    pre_pos[i, lp - len(p) :] = torch.arange(len(p), device=device)
                suf_ids[i, : len(x)] = torch.tensor(x, device=device)
                suf_mask[i, : len(x)] = 1
                suf_pos[i] = len(p) + torch.arange(ls, device=device)
            cache = None
            if lp:
                with torch.no_grad():
                    out = model(input_ids=pre_ids, attention_mask=pre_mask, position_ids=pre_pos, use_cache=True)
                cache = out.cache
            local = {r: i for i, r in enumerate(group)}
            mine = [(k, local[r], p - at[r]) for k, (r, p) in enumerate(reads.pairs) if r in local]
            keep = torch.tensor(sorted({p for _, _, p in mine}), dtype=torch.long, device=device)
            slot = torch.full((ls,), -1, dtype=torch.long, device=device)
            slot[keep] = torch.arange(len(keep), device=device)
            which = torch.tensor([k for k, _, _ in mine], dtype=torch.long, device=device)
            at_row = torch.tensor([i for _, i, _ in mine], dtype=torch.long, device=device)
            at_pos = slot[torch.tensor([p for _, _, p in mine], dtype=torch.long, device=device)]
            mask = torch.cat([pre_mask, suf_mask], dim=1)
            self.plans.append((suf_ids, mask, suf_pos, cache, keep, which, at_row, at_pos))
        self.zero = [torch.zeros(len(group), dtype=torch.long, device=device) for group in groups]

    @contextmanager
    def passes(self) -> Iterator[None]:
        yield

    def where(self, g: int) -> torch.Tensor:
        return self.zero[g]  # each pass starts at δ's token

    def run(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, pos, cache, keep, which, at_row, at_pos = self.plans[g]
        past = copy.deepcopy(cache) if cache is not None else None  # a pass appends to the cache it is given
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            cache=past,
            use_cache=past is not None,
            logits_to_keep=keep,
        ).logits.float()
        return torch.log_softmax(logits[at_row, at_pos], dim=-1), which


def keeps_prefix(model) -> bool:
    """Whether a prefix can be kept as an attention cache: not with sliding-window attention
    (a cache that drops what slides out of the window)."""
    config = model.config
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return set(kinds) <= {"full_attention"}
    return not getattr(config, "sliding_window", None)


def compute_targets(
    handle,
    requests: Sequence[EditRequest],
    templates: Sequence[Sequence[str]],
    units: Sequence[Sequence[int]],
    layer: int,
    h: torch.Tensor,
    hp: MemitParams,
    progress: Callable[[int, int, int], None] | None = None,
) -> Targets:
    """One z at ``layer`` for each unit (see the module docstring): ``units`` groups the requests
    that share their key (the same words up to the subject's last token), whose δ is optimised
    on all of their targets at once; ``h`` is (units, d) from keys.residuals.
    ``progress(step, units_done, units)`` is called after each step."""
    model, tok, adapter = handle.model, handle.tokenizer, handle.adapter
    device = next(model.parameters()).device
    n_units = len(units)
    rows: list[list[int]] = []
    unit_of: list[int] = []  # the unit of each row
    at: list[int] = []  # the position in each row where δ is added
    reads = Reads()
    tgt_reads: list[list[tuple[list[int], list[int]]]] = []  # unit -> rows -> (read indices, target ids)
    kl_reads: list[int] = []
    groups: list[list[int]] = []
    for u, members in enumerate(units):
        if not groups or len(groups[-1]) >= hp.rows_per_pass:
            groups.append([])
        mine = []
        for i in members:
            r, cs = requests[i], templates[i]
            target = tok(r.target, add_special_tokens=False)["input_ids"]
            for c in cs:
                text = c.format(r.prompt)
                prompt_ids = tok(text)["input_ids"]
                row = len(rows)
                rows.append(prompt_ids + target[:-1])
                unit_of.append(u)
                at.append(subject_last_token(tok, text, r.subject))
                groups[-1].append(row)
                mine.append(([reads.at(row, len(prompt_ids) - 1 + j) for j in range(len(target))], target))
        tgt_reads.append(mine)
        subject = requests[members[0]].subject
        kl_text = f"{subject} is a"
        row = len(rows)
        rows.append(tok(kl_text)["input_ids"])
        unit_of.append(u)
        at.append(subject_last_token(tok, kl_text, subject))
        groups[-1].append(row)
        kl_reads.append(reads.at(row, len(rows[row]) - 1))
    runner = (
        _KeptPrefix(model, tok, rows, at, groups, reads)
        if keeps_prefix(model)
        else _WholeRows(model, tok, rows, at, groups, reads, adapter, layer)
    )

    h = h.to(device=device, dtype=torch.float32)
    h_norm = h.norm(dim=1).clamp_min(1e-6)
    delta = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    unit_t = torch.tensor(unit_of, device=device)
    done = torch.zeros(n_units, dtype=torch.bool, device=device)
    nll_first = torch.full((n_units,), float("nan"))
    nll_last = torch.full((n_units,), float("nan"))
    kl_before: dict[int, torch.Tensor] = {}
    block = adapter.layer(layer)
    current: dict[str, torch.Tensor] = {}

    def add_delta(mod, args, output):
        hidden = adapter.residual(output)
        moved = hidden.index_put(
            (current["rows"], current["pos"]), delta[current["units"]].to(hidden.dtype), accumulate=True
        )
        return adapter.replace_residual(output, moved)

    steps = 0
    with frozen(model), runner.passes():
        hook = block.register_forward_hook(add_delta)
        try:
            for step in range(hp.v_steps + 1):
                opt.zero_grad()
                for g, group in enumerate(groups):
                    mine_units = sorted({unit_of[r] for r in group})
                    if all(done[u] for u in mine_units):
                        continue
                    local = torch.tensor(group, device=device)
                    current.update(
                        rows=torch.arange(len(group), device=device), pos=runner.where(g), units=unit_t[local]
                    )
                    logp, which = runner.run(g)  # in the order of ``which``
                    slot = {k: n for n, k in enumerate(which.tolist())}
                    loss = torch.zeros((), device=device)
                    for u in mine_units:
                        if done[u]:
                            continue
                        nll = torch.stack(
                            [
                                -logp[
                                    torch.tensor([slot[k] for k in idx], device=device), torch.tensor(t, device=device)
                                ].mean()
                                for idx, t in tgt_reads[u]
                            ]
                        ).mean()
                        value = float(nll.detach())
                        if step == 0:
                            nll_first[u] = value
                            kl_before[u] = logp[slot[kl_reads[u]]].detach()
                        nll_last[u] = value
                        if value < hp.nll_stop or step == hp.v_steps:
                            done[u] = value < hp.nll_stop
                            continue
                        kl_now = logp[slot[kl_reads[u]]]
                        kl = torch.sum(kl_before[u].exp() * (kl_before[u] - kl_now))
                        decay = hp.v_weight_decay * delta[u].norm() / h_norm[u] ** 2
                        loss = loss + nll + hp.kl_factor * kl + decay
                    if loss.requires_grad:
                        loss.backward()
                if step == hp.v_steps or bool(done.all()):
                    break
                stopped = done.clone()
                kept = delta.detach()[stopped].clone()
                opt.step()
                steps += 1
                with torch.no_grad():
                    delta[stopped] = kept  # a unit that stopped keeps its δ
                    norms = delta.norm(dim=1)
                    scale = torch.clamp(hp.clamp_norm_factor * h_norm / norms.clamp_min(1e-12), max=1.0)
                    delta.mul_(scale[:, None])
                if not torch.isfinite(delta).all():
                    raise FloatingPointError("δ became NaN or infinite during optimisation")
                if progress:
                    progress(steps, int(done.sum()), n_units)
        finally:
            hook.remove()
    return Targets((h + delta.detach()), h, nll_first, nll_last, steps)
