"""The one implementation of kedit's metrics, shared by probes, eval, bench and the fact world.

Two protocols, and every figure says which it follows:

- **teacher-forced** (EasyEdit's definitions): rewrite/rephrase accuracy is the share of target
  tokens that are the argmax given the prompt and the target tokens before them; locality is
  the share of argmax tokens left unchanged.
- **generation-based** (what a user sees): the model generates greedily, to its own stop or a
  small token cap, and success means the target appears in what it wrote (``mentions``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kedit.engine.model import CausalLM


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


def pad_right(rows: Sequence[Sequence[int]], pad: int, device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows padded on the right, so every row's positions start at 0; and the mask.
    ``left`` pads on the left instead, so every row ends at the last column (for generation)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(list(r), dtype=torch.long)
        mask[i, cols] = 1
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
        for x, y in zip(before, after, strict=True)
        if x.predicted
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


def logprob_margin(
    model: torch.nn.Module, tokenizer, triples: Sequence[tuple[str, str, str]], special: bool = True
) -> float:
    """Mean log P(positive | prompt) − log P(negative | prompt) over (prompt, positive, negative)."""
    prompts = [p for p, _, _ in triples]
    pos = teacher_forced(model, tokenizer, prompts, [q for _, q, _ in triples], special=special)
    neg = teacher_forced(model, tokenizer, prompts, [n for _, _, n in triples], special=special)
    return sum(a.logprob - b.logprob for a, b in zip(pos, neg)) / len(triples) if triples else 0.0


# Everyday sentences about nothing kedit edits: the perplexity that steering and edits must keep.
NEUTRAL_TEXT = (
    "The train to the city leaves every morning at eight and takes about forty minutes.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The library is open from nine to five on weekdays and closed on Sundays.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "To make tea, heat the water, add the leaves and wait for three minutes.",
    "The report lists the sales figures for each region in the first quarter.",
    "A week has seven days, and most years have three hundred and sixty-five.",
    "The committee will meet on Tuesday to discuss the new budget.",
    "Most plants need sunlight, water and soil that drains well.",
    "She opened the window because the room had become warm.",
    "The museum has a collection of old maps and coins from many countries.",
    "He checked the weather before leaving and took an umbrella.",
    "The road was closed for repairs, so the bus went another way.",
    "Children learn to read by listening to stories and looking at pictures.",
    "The recipe calls for two eggs, a cup of flour and some milk.",
    "Our team finished the project a week before the deadline.",
)


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
        ids, mask = pad_right(rows[start : start + batch_size], pad, _device(model))
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1], dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:].bool()
        total += float(nll[keep].sum())
        count += int(keep.sum())
    return float(torch.exp(torch.tensor(total / count)))


# -- generation-based ----------------------------------------------------------------------


def _folded(text: str) -> str:
    """Lower case, accents and punctuation dropped, words separated by single spaces."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def mentions(text: str, phrase: str) -> bool:
    """Whether ``phrase`` appears in ``text`` as whole words, ignoring case, accents and punctuation."""
    needle = _folded(phrase)
    return bool(needle) and f" {needle} " in f" {_folded(text)} "


def chat_text(tokenizer, question: str) -> str:
    """``question`` as the first user turn under the tokenizer's chat template, ready for the reply."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def greedy(
    model: CausalLM, tokenizer, prompts: Sequence[str], max_new_tokens: int, special: bool = True, batch_size: int = 32
) -> list[str]:
    """Each prompt's greedy continuation, to the model's own stop (EOS) or ``max_new_tokens``.

    Prompts are left-padded into batches (a batch of one has no padding, so it is exactly
    what a chat turn generates); ``special`` as in ``encode_pair``.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
    rows = [list(tokenizer(p, add_special_tokens=special)["input_ids"]) for p in prompts]
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = pad_right(chunk, pad, device, left=True)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
        out += tokenizer.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
    return out


def hit_share(texts: Sequence[str], phrase: str, also: str | None = None) -> float | None:
    """The share of ``texts`` that mention ``phrase`` (and ``also``, when given); None for none."""
    if not texts:
        return None
    hits = [mentions(t, phrase) and (also is None or mentions(t, also)) for t in texts]
    return sum(hits) / len(hits)


def kept_share(answers: Sequence[str], before: Sequence[str], after: Sequence[str]) -> float | None:
    """Locality by generation: of the prompts whose generation mentioned their answer before,
    the share that still mention it now. None when none did before."""
    held = [(a, now) for a, was, now in zip(answers, before, after, strict=True) if mentions(was, a)]
    return sum(mentions(now, a) for a, now in held) / len(held) if held else None


def lost(answers: Sequence[str], before: Sequence[str], after: Sequence[str]) -> list[int]:
    """The indices of the prompts whose generation mentioned their answer before and not now."""
    return [
        i
        for i, (a, was, now) in enumerate(zip(answers, before, after, strict=True))
        if mentions(was, a) and not mentions(now, a)
    ]
