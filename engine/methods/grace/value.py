"""GRACE's value: what an entry puts out so that the model says the target."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kedit.engine.methods.grace.params import GraceParams
from kedit.engine.methods.hooks import frozen, run_until
from kedit.engine.methods.replay import replay_below
from kedit.engine.metrics import encode_pair


@torch.no_grad()
def key_and_output(model, tokenizer, module, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's input and output at the prompt's last token, codebook included."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    seen = run_until(model, module, input_ids=ids)
    return seen["input"][0, -1].float(), seen["output"][0, -1].float()


def train_value(
    model,
    tokenizer,
    module,
    prompt: str,
    target: str,
    init: torch.Tensor,
    hp: GraceParams,
    progress: Callable[[int, float], None] | None = None,
    *,
    adapter=None,
    layer: int = 0,
) -> tuple[torch.Tensor, float, float, int]:
    """A value that, put out at the prompt's last token, makes the model say ``target``.

    With ``adapter`` and ``layer`` (the block of ``module``), passes after the first skip the
    blocks below it (kedit.engine.methods.replay).
    """
    device = next(model.parameters()).device
    prompt_ids, target_ids = encode_pair(tokenizer, prompt, target)
    ids = torch.tensor([prompt_ids + target_ids[:-1]], device=device)
    pos = len(prompt_ids) - 1
    tgt = torch.tensor(target_ids, device=device)
    at = torch.arange(len(target_ids), device=device)  # the target's places among the kept logits
    value = init.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([value], lr=hp.lr)

    def hook(mod, args, output):
        out = output.clone()
        out[0, pos] = value.to(out.dtype)
        return out

    first = nll = float("nan")
    steps = 0
    with frozen(model), replay_below(adapter, layer):
        handle = module.register_forward_hook(hook)
        try:
            for step in range(hp.n_iter + 1):
                # the target's positions are the last len(target) ones: logits there only
                logits = model(input_ids=ids, logits_to_keep=len(target_ids)).logits[0].float()
                loss = -torch.log_softmax(logits, dim=-1)[at, tgt].mean()
                nll = float(loss.detach())
                first = nll if step == 0 else first
                if progress:
                    progress(step, nll)
                if nll < hp.nll_stop or step == hp.n_iter:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
                if not torch.isfinite(value).all():
                    raise FloatingPointError("the GRACE value became NaN or infinite")
        finally:
            handle.remove()
    return value.detach(), first, nll, steps
