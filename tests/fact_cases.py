"""Edit cases drawn from the fact world, shared by the tests that measure editing methods."""

from __future__ import annotations

import random

import torch


def edit_cases(session, n: int, seed: int):
    """n facts of the world, each with a new object of the same relation as the target."""
    world = session.fact_world()
    out = []
    for f in random.Random(seed).sample(world.facts, n):
        others = sorted({x.object for x in world.facts if x.relation == f.relation} - {f.object})
        out.append((f, random.Random(f.subject).choice(others)))
    return out


def prompt_logits(session, prompts: list[str]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [session.model(session.tokenizer(p, return_tensors="pt")["input_ids"]).logits for p in prompts]
