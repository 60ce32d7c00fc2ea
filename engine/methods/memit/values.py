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
allows it, they are run once and kept (kedit.engine.methods.reads.KeptPrefix), and each pass runs
only the rest of each row, which on SmolLM2-135M made the values 2.5 times as fast. With
sliding-window attention (the fact world) whole rows are run. Either way the blocks below L are
replayed (kedit.engine.methods.replay).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kedit.engine.methods.base import EditRequest
from kedit.engine.methods.hooks import frozen
from kedit.engine.methods.memit.params import MemitParams
from kedit.engine.methods.reads import KeptPrefix, Reads, WholeRows, keeps_prefix
from kedit.engine.subject import subject_last_token


@dataclass
class Targets:
    z: torch.Tensor  # (units, d): the residual stream each unit's subject should have at L
    h: torch.Tensor  # (units, d): what it has before the edit
    nll_before: torch.Tensor  # (units,)
    nll_after: torch.Tensor  # (units,)
    steps: int  # optimisation steps taken (the slowest unit's)


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
        KeptPrefix(model, tok, rows, at, groups, reads, adapter, layer)
        if keeps_prefix(model)
        else WholeRows(model, tok, rows, groups, reads, adapter, layer)
    )
    at_t = torch.tensor(at, device=device)

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
                    at_rows, at_pos = runner.place(g, at_t[local])
                    current.update(rows=at_rows, pos=at_pos, units=unit_t[local])
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
