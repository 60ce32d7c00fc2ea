"""How well the fact-world model knows its facts: teacher-forced recall on seen and unseen wording."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kedit.engine.factworld.build import BuildSettings
from kedit.engine.factworld.corpus import FactWorld
from kedit.engine.metrics import Scored, mean_accuracy, teacher_forced


def _row(scored: list[Scored]) -> dict[str, Any]:
    return {
        "accuracy": mean_accuracy(scored),
        "exact": sum(s.accuracy == 1.0 for s in scored) / len(scored),
        "n": len(scored),
    }


def recall_sets(world: FactWorld, tokenizer) -> dict[str, tuple[list[str], list[str], bool]]:
    """Named (prompts, targets, add-BOS) sets: trained phrasings, held-out ones, and chat questions."""
    facts = world.facts
    seen = [(f.prompt(t), f.target) for f in facts for t in f.seen_templates]
    sets: dict[str, tuple[list[str], list[str], bool]] = {
        "canonical (trained)": ([f.prompt(0) for f in facts], [f.target for f in facts], True),
        "all trained phrasings": ([p for p, _ in seen], [t for _, t in seen], True),
        "unseen phrasings": ([f.prompt(f.held_out) for f in facts], [f.target for f in facts], True),
    }
    asked = {d[0]["content"] for d, _ in world.dialogues()}
    every = [(f, q.format(s=f.subject)) for f in facts for q in f.rel.questions]
    for name, questions in (
        ("chat, trained questions", [x for x in every if x[1] in asked]),
        ("chat, unseen questions", [x for x in every if x[1] not in asked]),
    ):
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            + f.prompt(0)
            for f, q in questions
        ]
        sets[name] = (prompts, [f.target for f, _ in questions], False)
    return sets


@torch.no_grad()
def measure(model, tokenizer, world: FactWorld) -> dict[str, dict[str, Any]]:
    return {
        name: _row(teacher_forced(model, tokenizer, prompts, targets, special=special))
        for name, (prompts, targets, special) in recall_sets(world, tokenizer).items()
    }


@torch.no_grad()
def chat_answers(model, tokenizer, world: FactWorld, n: int = 40) -> dict[str, Any]:
    """Free generation in chat: does the reply name the right subject and object?

    Teacher forcing hands the model the subject; here it must copy it from the question.
    """
    import random

    facts = random.Random(0).sample(world.facts, min(n, len(world.facts)))
    right = 0
    for f in facts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f.rel.questions[0].format(s=f.subject)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        right += f.subject in reply and f.object in reply
    return {"accuracy": right / len(facts), "exact": right / len(facts), "n": len(facts)}


def recall_report(folder: Path, settings: BuildSettings) -> dict[str, Any]:
    """Load the built folder and measure recall; merges in the build's own record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((Path(folder) / "fact_world.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    world = settings.world()
    recall = measure(model, tokenizer, world)
    recall["chat, generated answers (subject and object right)"] = chat_answers(model, tokenizer, world)
    return {**info, "folder": str(folder), "recall": recall}
