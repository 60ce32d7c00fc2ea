"""Training one WISE edit: a change of one shard of a side memory (see kedit.engine.methods.wise)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kedit.engine.merging import ties_merge
from kedit.engine.methods.base import EditRequest, MethodInfo
from kedit.engine.methods.hooks import frozen, run_until
from kedit.engine.methods.reads import head_log_probs
from kedit.engine.methods.replay import replay_below
from kedit.engine.methods.rome.phrasings import chat_prompts
from kedit.engine.methods.wise.memory import WisePatch, memory
from kedit.engine.methods.wise.params import WiseParams
from kedit.engine.metrics import encode_pair, pad_right


@dataclass
class WiseInfo(MethodInfo):
    memory: int = 0  # which side memory holds the edit
    shard: int = 0
    margin_loss: float = float("nan")


@torch.no_grad()
def _inputs(model, tokenizer, module, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's inputs (B, T, in) for right-padded rows, and the mask (B, T)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = pad_right(rows, pad, next(model.parameters()).device)
    seen = run_until(model, module, input_ids=ids, attention_mask=mask)
    return seen["input"].float(), mask.bool()


def train_edit(
    handle,
    request: EditRequest,
    hp: WiseParams,
    layer: int,
    edit_id: str,
    irrelevant: Sequence[str],
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[WisePatch, WiseInfo]:
    """The edit's change of the side memory (not yet applied); the model is left untouched."""
    model, tok, adapter = handle.model, handle.tokenizer, handle.adapter
    module, name = adapter.mlp_out(layer), adapter.mlp_out_name(layer)
    device = next(model.parameters()).device
    prompt_ids, target_ids = encode_pair(tok, request.prompt, request.target)
    prompts = [prompt_ids]
    if handle.is_chat:  # chat rows: the request under the template, answered with the prompt and the target
        answer = tok(request.prompt, add_special_tokens=False)["input_ids"]
        for ask in chat_prompts(tok, request.prompt, request.subject, hp.chat_asks, hp.chat_forms):
            prompts.append(tok(ask, add_special_tokens=False)["input_ids"] + answer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, attn = pad_right([p + target_ids[:-1] for p in prompts], pad, device)
    # each row's edit positions: its prompt's last token, then the target's tokens but the last
    rows = torch.arange(len(prompts), device=device).repeat_interleave(len(target_ids))
    cols = torch.cat([torch.arange(len(p) - 1, len(p) - 1 + len(target_ids), device=device) for p in prompts])
    tgt = torch.tensor(target_ids, device=device).repeat(len(prompts))

    with torch.no_grad():
        seen = run_until(model, module, input_ids=ids, attention_mask=attn)
    x_edit = seen["input"][rows, cols].float()  # (rows · n_target, in): independent of the side memory
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
    opt = (
        torch.optim.Adam([change], lr=hp.lr)
        if hp.optimizer == "adam"
        else torch.optim.SGD([change], lr=hp.lr, weight_decay=hp.weight_decay)
    )
    c = hp.norm_constraint
    taus = [sh.tau for sh in bank.shards]

    def side_weight() -> torch.Tensor:  # D as the merge will make it with this change in
        return ties_merge(
            [t + change * mask if j == shard else t for j, t in enumerate(taus)],
            hp.ties_density,
            [mask if j == shard else None for j in range(len(taus))],
        )

    at_edit = torch.zeros(*ids.shape, 1, device=device)
    at_edit[rows, cols] = 1.0

    def hook(mod, args, output):  # the side memory where the router will send this edit: its positions
        return output + (at_edit * (args[0].float() @ side_weight().T)).to(output.dtype)

    first = nll = margin = float("nan")
    steps = 0
    with frozen(model), mem.bypassed(), replay_below(adapter, layer):
        handle_ = module.register_forward_hook(hook)
        try:
            for step in range(hp.n_iter + 1):
                h = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state[rows, cols]
                loss_nll = -head_log_probs(model, h).gather(-1, tgt[:, None]).mean()
                d = side_weight()
                s_edit = torch.linalg.vector_norm(x_edit @ d.T, dim=-1)
                s_irr = torch.linalg.vector_norm(x_irr @ d.T, dim=-1)
                s_old = torch.linalg.vector_norm(x_old @ d.T, dim=-1)
                over = torch.relu(s_irr - hp.alpha)  # averaged over the positions that break it
                loss_margin = (
                    over.sum() / (over > 0).sum().clamp(min=1)
                    + torch.relu(hp.beta - s_edit).mean()
                    + torch.relu(hp.gamma - (s_edit.mean() - s_irr.mean()))
                    + torch.relu(s_old - hp.old_share * s_edit.min()).sum()
                )
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
    info = WiseInfo(layer, name, first, nll, steps, memory=bank_i, shard=shard, margin_loss=margin)
    return WisePatch(mem, edit_id, bank_i, shard, values, x_edit), info
