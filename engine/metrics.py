"""The one implementation of kedit's metrics, shared by probes, eval, bench and the fact world.

Definitions follow EasyEdit: rewrite/rephrase accuracy is teacher-forced token
accuracy (the share of target tokens that are the argmax given the prompt and the
target tokens before them); locality is the share of argmax tokens left unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Scored:
    """Teacher-forced result for one (prompt, target) pair."""

    accuracy: float  # share of target tokens predicted exactly
    predicted: list[int]  # argmax token at each target position
    target: list[int]
    logprob: float  # sum of log-probabilities of the target tokens
    next_logp: torch.Tensor | None = None  # log-probabilities of the token right after the prompt


def encode_pair(tokenizer, prompt: str, target: str, special: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the target.

    ``special`` lets the tokenizer add its own BOS to the prompt; turn it off for text
    already rendered by a chat template, which carries its own.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(target_ids)


def pad_right(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows padded on the right, so every row's positions start at 0; and the mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_forced(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 64,
    special: bool = True,
    keep_next: bool = False,
) -> list[Scored]:
    """Score each target after its prompt by teacher forcing, in right-padded batches."""
    pairs = [encode_pair(tokenizer, p, t, special) for p, t in zip(prompts, targets, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
    out: list[Scored] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        ids, mask = pad_right([p + t for p, t in chunk], pad, device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for row, (p, t) in enumerate(chunk):
            # the token at position j is predicted from position j-1
            pos = torch.arange(len(p) - 1, len(p) + len(t) - 1, device=logits.device)
            tgt = torch.tensor(t, device=logits.device)
            pred = logits[row, pos].argmax(-1)
            out.append(
                Scored(
                    accuracy=float((pred == tgt).float().mean()) if t else 0.0,
                    predicted=pred.tolist(),
                    target=t,
                    logprob=float(logp[row, pos, tgt].sum()),
                    next_logp=logp[row, len(p) - 1].cpu() if keep_next else None,
                )
            )
    return out


def mean_accuracy(scored: Sequence[Scored]) -> float:
    """Mean teacher-forced accuracy over examples (EasyEdit averages per example)."""
    return sum(s.accuracy for s in scored) / len(scored) if scored else 0.0


def unchanged_share(before: Sequence[Scored], after: Sequence[Scored]) -> float:
    """EasyEdit's locality: the mean share of target positions whose argmax did not change."""
    shares = [
        sum(a == b for a, b in zip(x.predicted, y.predicted)) / len(x.predicted)
        for x, y in zip(before, after, strict=True) if x.predicted
    ]
    return sum(shares) / len(shares) if shares else 1.0


def kl_next(before: Sequence[Scored], after: Sequence[Scored]) -> float:
    """Mean KL(before ‖ after) of the next-token distributions (nats)."""
    values = [
        float(torch.sum(x.next_logp.exp() * (x.next_logp - y.next_logp)))
        for x, y in zip(before, after, strict=True)
        if x.next_logp is not None and y.next_logp is not None
    ]
    return sum(values) / len(values) if values else 0.0


def logprob_margin(model: torch.nn.Module, tokenizer, triples: Sequence[tuple[str, str, str]],
                   special: bool = True) -> float:
    """Mean log P(positive | prompt) − log P(negative | prompt) over (prompt, positive, negative)."""
    prompts = [p for p, _, _ in triples]
    pos = teacher_forced(model, tokenizer, prompts, [q for _, q, _ in triples], special=special)
    neg = teacher_forced(model, tokenizer, prompts, [n for _, _, n in triples], special=special)
    return sum(a.logprob - b.logprob for a, b in zip(pos, neg)) / len(triples) if triples else 0.0


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32) -> float:
    """exp of the mean next-token NLL over every token of ``texts`` after its first."""
    rows = [list(tokenizer(t)["input_ids"]) for t in texts]
    rows = [r for r in rows if len(r) > 1]
    if not rows:
        raise ValueError("perplexity needs texts of at least two tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        ids, mask = pad_right(rows[start:start + batch_size], pad, _device(model))
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1], dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:].bool()
        total += float(nll[keep].sum())
        count += int(keep.sum())
    return float(torch.exp(torch.tensor(total / count)))
