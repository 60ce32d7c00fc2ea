"""δ: the change to the MLP output at the subject's last token that makes the model say the
target (ROME eq. 4), found by gradient descent with the model frozen.

loss = mean NLL of the target after every context prefix
     + kl_factor · KL(P_before ‖ P_now) of the next token after "{subject} is a"
     + wording_kl · mean KL(P_before ‖ P_now) at the prompt's own words after the subject
     + v_weight_decay · ‖δ‖² / ‖v‖²
and after each step ‖δ‖ is clamped to clamp_norm_factor · ‖v‖.

The wording term is kedit's addition (wording_kl = 0 gives the paper's loss). Without it
a strong δ can make the subject predict the target at once: asked to complete "Watts
Humphrey attended", a chat model restating the prompt wrote "Watts Humphrey University
attended ...". The term keeps "attended" the likely word after "Watts Humphrey".

The paper adds δ at the subject's last token only. The rank-one update that follows adds
δ · (C⁻¹k*)ᵀx / (k*ᵀC⁻¹k*) at *every* position x, and keys elsewhere are not orthogonal
to C⁻¹k* (a first name right before the last one can carry half of it). So δ is added
here exactly as the update will add it: at each position, scaled by that coefficient,
which is 1 at k*. The optimised loss is then the loss of the edited model itself, and
an edit that converged here holds after the update.

Most tokens of a row come before the subject (a context prefix, the chat template's system
turn), and the update reaches them only by a few percent of δ (SmolLM2-135M: mean 0.02-0.05,
the subject's own tokens about 1). Where the model's attention cache allows it, each row's
tokens before the first that the update reaches by more than ``prefix_reach`` of δ are run
once, without δ, and kept as the attention cache (``prefix_cuts``,
kedit.engine.methods.reads.KeptPrefix); each pass runs only the rest. That leaves out of the
optimisation at most ``prefix_reach`` · δ at each kept token, and runs a third of the tokens:
on SmolLM2-135M each step took 0.6 s instead of 1.2 s, and the edits reached the same NLL.
The rows' rests are then packed into one pass, no padding (KeptPrefix): the value took 0.7×
the time of padded groups on the same three facts, in one run, with the same figures.
``prefix_reach = 0``, and models with sliding-window attention, run whole rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kedit.engine.methods.hooks import frozen, run_until
from kedit.engine.methods.reads import KeptPrefix, Reads, WholeRows, keeps_prefix
from kedit.engine.methods.rome.hparams import RomeParams
from kedit.engine.metrics import pad_right
from kedit.engine.subject import subject_last_token, subject_token_span


@dataclass
class ValueResult:
    delta: torch.Tensor  # δ, float32, on the model's device
    nll_before: float
    nll_after: float
    steps: int
    opening_delta: torch.Tensor | None = None  # δ₂, with an ``Opening``


@dataclass
class Opening:
    """A wording that opens with the subject, which the update reaches through a second key
    (kedit.engine.methods.rome.phrasings): its row joins the loop, and its value δ₂ is
    optimised with δ, added along its own direction."""

    text: str  # "Germany's capital is"
    head: str  # the words up to its key's token: "Germany's"
    direction: torch.Tensor  # d₂: d₂ᵀx is the share of δ₂ added at x
    v: torch.Tensor  # the module's output at its key (its norm scales δ₂'s clamp and decay)
    clamp: float  # ‖δ₂‖ ≤ clamp · ‖v‖


@contextmanager
def add_along(module: torch.nn.Module, direction: torch.Tensor, delta: torch.Tensor):
    """Add ``Σⱼ (directionⱼᵀx) · deltaⱼ`` to the module's output at every position, x its input:
    direction (in, r) and delta (r, out), or one of each as vectors."""
    if direction.dim() == 1:
        direction, delta = direction[:, None], delta[None]

    def hook(mod, args, output):
        scale = args[0].to(direction.dtype) @ direction  # (..., r)
        return output + (scale[..., None] * delta).sum(-2).to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def prefix_cuts(
    model, tokenizer, module, rows, groups, reads: Reads, direction: torch.Tensor, reach: float
) -> list[int]:
    """Where each row can be cut for kedit.engine.methods.reads.KeptPrefix: before the first
    position the update reaches by more than ``reach`` of δ (|directionᵀx| at the module's
    input x), and before the row's first read. What the update adds before the cut is left
    out of the optimisation: at most ``reach`` of δ at each such position."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cut = [0] * len(rows)
    for group in groups:
        ids, mask = pad_right([rows[r] for r in group], pad, device)
        seen = run_until(model, module, input_ids=ids, attention_mask=mask)
        share = (seen["input"].float() @ direction).abs()  # (rows, positions[, directions])
        share = share.amax(-1) if share.dim() == 3 else share
        for i, r in enumerate(group):
            over = torch.nonzero(share[i, : len(rows[r])] > reach)
            first = int(over[0, 0]) if len(over) else len(rows[r])
            read = reads.first(r)
            cut[r] = min(first, len(rows[r]) if read is None else read)
    return cut


def compute_value(
    model,
    tokenizer,
    module,
    prompt: str,
    subject: str,
    target: str,
    contexts: Sequence[str],
    v: torch.Tensor,
    direction: torch.Tensor,
    hp: RomeParams,
    progress: Callable[[int, float], None] | None = None,
    *,
    adapter=None,
    layer: int = 0,
    chat: Sequence[str] = (),
    opening: Opening | None = None,
    rewordings: Sequence[tuple[str, str]] = (),
) -> ValueResult:
    """Optimise δ (see module docstring); ``target`` is the continuation, leading space included.

    ``v`` is the module's mean output at the subject (from compute_key): δ has its width,
    and ‖v‖ scales the clamp and the weight decay. ``direction`` is C⁻¹k* / (k*ᵀC⁻¹k*),
    which sets how much of δ the update adds at each position. With ``adapter`` and
    ``layer`` (the block of ``module``), passes after the first skip the blocks below it
    (kedit.engine.methods.replay).

    ``chat`` are requests already under the chat template (kedit.engine.methods.rome.phrasings):
    each is a further row whose answer is the prompt and the target. Its target counts in the
    NLL like the other rows', and the NLL of the subject's tokens restated in its answer is
    added with weight ``hp.restate_weight``, so that δ does not change which subject the
    model names.

    With ``opening``, its wording is one more row, its words after its head count in the
    wording term, and δ₂ is optimised beside δ (``ValueResult.opening_delta``).

    ``rewordings`` are (text, the subject as spelled in it): further plain rows, which the
    first key reads (kedit.engine.methods.rome.phrasings.possessive), each followed by the
    target, and their words after the subject count in the wording term.
    """
    v_norm = float(v.norm()) or 1.0
    device = next(model.parameters()).device
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    rewrite = [c.format(prompt) for c in contexts] + [text for text, _ in rewordings]
    heads = [subject] * len(contexts) + [head for _, head in rewordings]
    kl_text = f"{subject} is a"
    prompt_ids = [tokenizer(t)["input_ids"] for t in rewrite]
    # chat rows: the request under the template, then the answer (the prompt) without special tokens
    answer_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    prompt_ids += [tokenizer(c, add_special_tokens=False)["input_ids"] + answer_ids for c in chat]
    if opening is not None:
        prompt_ids.append(tokenizer(opening.text)["input_ids"])
    n = len(prompt_ids)
    # teacher forcing: each row is its prompt + target[:-1]; the KL row comes last
    rows = [p + target_ids[:-1] for p in prompt_ids] + [tokenizer(kl_text)["input_ids"]]
    reads = Reads()
    tgt_at = [[reads.at(i, len(p) - 1 + j) for j in range(len(target_ids))] for i, p in enumerate(prompt_ids)]
    kl_at = reads.at(n, len(rows[n]) - 1)
    # the prompt's own words after the subject ("attended" after "Watts Humphrey")
    worded = [(i, text, head) for i, (text, head) in enumerate(zip(rewrite, heads))]
    if opening is not None:
        worded.append((n - 1, opening.text, opening.head))
    w_at = [
        reads.at(i, t)
        for i, text, head in worded
        for t in range(subject_last_token(tokenizer, text, head), len(prompt_ids[i]) - 1)
    ]
    # the subject restated in the chat answers: the position before each of its tokens
    r_at, r_tok = [], []
    for i, c in enumerate(chat):
        start, end = subject_token_span(tokenizer, c + prompt, subject, special=False)
        if hp.restate == "answer":  # the whole restated prompt, not only the subject's tokens
            start, end = len(prompt_ids[len(rewrite) + i]) - len(answer_ids), len(prompt_ids[len(rewrite) + i])
        for t in range(max(start, 1), end):
            r_at.append(reads.at(len(rewrite) + i, t - 1))
            r_tok.append(rows[len(rewrite) + i][t])
    # padded rows: one forward pass per kind of row (plain with the KL row, chat), so that no row
    # is padded to a chat row's length; kept prefixes pack every row into one pass
    plain = list(range(len(rewrite))) + ([n - 1] if opening is not None else []) + [n]
    groups = [g for g in (plain, list(range(len(rewrite), len(rewrite) + len(chat)))) if g]
    direction = direction.to(device=device, dtype=torch.float32)[:, None]
    norms = [v_norm]
    clamps = [hp.clamp_norm_factor * v_norm]
    if opening is not None:
        direction = torch.cat([direction, opening.direction.to(device=device, dtype=torch.float32)[:, None]], 1)
        norms.append(float(opening.v.norm()) or 1.0)
        clamps.append(opening.clamp * norms[-1])
    if hp.prefix_reach > 0 and keeps_prefix(model):
        cut = prefix_cuts(model, tokenizer, module, rows, groups, reads, direction, hp.prefix_reach)
        runner: WholeRows | KeptPrefix = KeptPrefix(
            model, tokenizer, rows, cut, [sum(groups, [])], reads, adapter, layer
        )
    else:
        runner = WholeRows(model, tokenizer, rows, groups, reads, adapter, layer)
    tgt = torch.tensor(target_ids, device=device)
    tgt_idx = torch.tensor(tgt_at, dtype=torch.long, device=device)  # (n, len(target))
    w_idx = torch.tensor(w_at, dtype=torch.long, device=device)
    r_idx = torch.tensor(r_at, dtype=torch.long, device=device)
    r_tok_t = torch.tensor(r_tok, dtype=torch.long, device=device)

    delta = torch.zeros(direction.shape[1], v.shape[-1], device=device, requires_grad=True)  # (r, out)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = torch.tensor(clamps, device=device)
    kl_before: torch.Tensor | None = None
    nll_first = nll = float("nan")
    steps = 0
    with frozen(model), runner.passes():
        for step in range(hp.v_steps + 1):
            with add_along(module, direction, delta):
                logp = runner.log_probs()  # (reads, vocab)
            tok_logp = logp[tgt_idx, tgt[None, :]]  # (n, len(target))
            nll_t = -tok_logp.mean(1).mean()
            kl_now = logp[kl_at]
            w_now = logp[w_idx]
            if kl_before is None:
                kl_before, w_before = kl_now.detach(), w_now.detach()
            nll = float(nll_t.detach())
            if step == 0:
                nll_first = nll
            if progress:
                progress(step, nll)
            if nll < hp.nll_stop or step == hp.v_steps:
                break
            kl = torch.sum(kl_before.exp() * (kl_before - kl_now))
            kl_wording = torch.sum(w_before.exp() * (w_before - w_now), dim=-1).mean() if w_at else 0.0
            decay = sum(hp.v_weight_decay * delta[j].pow(2).sum() / (norms[j] ** 2) for j in range(len(norms)))
            restated = -logp[r_idx, r_tok_t].mean() if r_at else 0.0
            loss = nll_t + hp.kl_factor * kl + hp.wording_kl * kl_wording + hp.restate_weight * restated + decay
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            with torch.no_grad():
                delta.mul_(torch.clamp(max_norm / delta.norm(dim=1).clamp_min(1e-12), max=1.0)[:, None])
            if not torch.isfinite(delta).all():
                raise FloatingPointError("δ became NaN or infinite during optimisation")
    found = delta.detach()
    return ValueResult(found[0], nll_first, nll, steps, found[1] if opening is not None else None)
