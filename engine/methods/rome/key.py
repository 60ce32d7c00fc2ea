"""k*: the key of the subject, the input of the MLP output projection at the subject's last
token, averaged over context prefixes the model wrote itself (ROME eq. 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kedit.engine.methods.hooks import run_until
from kedit.engine.metrics import pad_right
from kedit.engine.subject import subject_last_token


def context_prefixes(model, tokenizer, n: int, length: int, seed: int = 0) -> list[str]:
    """'' (no prefix) plus n short texts sampled from the model (fixed seed), ending in '.'."""
    if n <= 0:
        return [""]
    starts = ["The", "Therefore", "Because", "I", "You", "It", "In", "A", "When", "This"]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[str] = [""]
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        for i in range(n):  # one at a time: no padding to get wrong
            row = ([bos] if bos is not None else []) + tokenizer(starts[i % len(starts)], add_special_tokens=False)[
                "input_ids"
            ]
            ids = torch.tensor([row], device=device)
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                top_k=5,
                max_new_tokens=length,
                pad_token_id=tokenizer.pad_token_id,
            )
            text = tokenizer.decode(gen[0], skip_special_tokens=True).replace("{", " ").replace("}", " ")
            out.append(text.strip().split("\n")[0].rstrip(".") + ".")
    return out


def context_templates(tokenizer, prefixes: Sequence[str], prompt: str) -> list[str]:
    """'{}' templates: each prefix joined to the prompt so that the prompt keeps its own tokens.

    A byte-level BPE tokenizes a sentence-initial name without the space it has mid-text
    ("Denny" vs " Denny"), which would give the subject another key; joining with a
    newline keeps it as it is at the start of a text. The separator is chosen per prompt:
    a space where that already keeps the tokens (sentencepiece), else a newline.
    """
    own = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for prefix in prefixes:
        if not prefix:
            out.append("{}")
            continue
        sep = "\n"
        for candidate in (" ", "\n"):
            ids = tokenizer(prefix + candidate + prompt, add_special_tokens=False)["input_ids"]
            if ids[-len(own) :] == own:
                sep = candidate
                break
        out.append(prefix.replace("{", " ").replace("}", " ") + sep + "{}")
    return out


def right_padded(tokenizer, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize texts (with the tokenizer's BOS) and pad them on the right."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pad_right([tokenizer(t)["input_ids"] for t in texts], pad, device)


@torch.no_grad()
def subject_keys(
    model, tokenizer, module, texts: Sequence[str], subjects: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's input and output at each subject's last token in each text, float32:
    ((len(texts), d_in), (len(texts), d_out))."""
    idx = [subject_last_token(tokenizer, t, s) for t, s in zip(texts, subjects)]
    ids, mask = right_padded(tokenizer, texts, next(model.parameters()).device)
    seen = run_until(model, module, input_ids=ids, attention_mask=mask)
    rows = torch.arange(len(texts), device=ids.device)
    pos = torch.tensor(idx, device=ids.device)
    return seen["input"][rows, pos].float(), seen["output"][rows, pos].float()


def compute_key(
    model, tokenizer, module, prompt: str, subject: str, contexts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k*, v): the mean key at the subject's last token over contexts, and the mean output there."""
    texts = [c.format(prompt) for c in contexts]
    keys, outs = subject_keys(model, tokenizer, module, texts, [subject] * len(texts))
    return keys.mean(0), outs.mean(0)
