"""The locality probe run after every edit: what the edit changed, and what it left alone.

Definitions are EasyEdit's (one implementation, ``kedit.engine.metrics``): Rel and Gen are
teacher-forced token accuracy of the target after the prompt and after its paraphrases;
Loc is the share of argmax tokens on unrelated prompts' answers left unchanged. Next-token
agreement and KL compare the distribution right after each unrelated prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from kedit.engine.metrics import Scored, kl_next, mean_accuracy, teacher_forced, unchanged_share

DEFAULT_LOCALITY = [
    "The capital of France is", "The Eiffel Tower is located in", "Water is made of hydrogen and",
    "The first president of the United States was", "The largest planet in the solar system is",
    "Python is a programming", "The Beatles were a band from", "Mount Everest is in",
    "The chemical symbol for gold is", "Shakespeare wrote", "The Great Wall is in",
    "Albert Einstein developed the theory of",
]


@dataclass
class LocalitySet:
    """Unrelated prompts and the answers to teacher-force (the model's own when not given)."""

    prompts: list[str]
    answers: list[str]


@dataclass
class ProbeRow:
    prompt: str
    before: str  # top next token before the edit
    after: str
    changed: bool


@dataclass
class LocalityResult:
    """How the locality prompts moved between two states of the model."""

    loc: float  # share of unchanged argmax tokens on their answers
    agree: float  # share of unchanged top next tokens
    kl: float  # mean KL(before ‖ after) of the next token
    rows: list[ProbeRow] = field(default_factory=list)


@dataclass
class ProbeResult:
    rel: float
    gen: float | None
    loc: float
    agree: float
    kl: float
    rows: list[ProbeRow] = field(default_factory=list)

    def summary(self) -> str:
        gen = "—" if self.gen is None else f"{self.gen:.2f}"
        return (f"Rel {self.rel:.2f} · Gen {gen} · Loc {self.loc:.2f} · "
                f"next-token agree {self.agree:.2f} · KL {self.kl:.4f}")

    def as_dict(self) -> dict[str, Any]:
        return {"rel": self.rel, "gen": self.gen, "loc": self.loc, "agree": self.agree, "kl": self.kl,
                "rows": [vars(r) for r in self.rows]}


def locality_set(handle, config, exclude_subjects: set[str], known: dict[str, str] | None = None) -> LocalitySet:
    """The fact world's other facts, else kedit.toml's [probes] locality prompts with the model's
    own answers (``known`` holds answers already found for this state of the model)."""
    n = int(config.get("probes.n_locality", 24))
    if handle.source.kind == "fact-world":
        from kedit.engine.factworld.build import BuildSettings

        world = BuildSettings.from_config(config.table("fact_world")).world()
        facts = [f for f in world.facts if f.subject not in exclude_subjects]
        picked = random.Random(0).sample(facts, min(n, len(facts)))  # every relation, fixed draw
        return LocalitySet([f.prompt(0) for f in picked], [f.target for f in picked])
    prompts = list(config.get("probes.locality", DEFAULT_LOCALITY))
    prompts = [p for p in prompts if not any(s in p for s in exclude_subjects)][:n]
    return LocalitySet(prompts, own_answers(handle, prompts, known=known))


@torch.no_grad()
def own_answers(handle, prompts: list[str], tokens: int = 3, known: dict[str, str] | None = None) -> list[str]:
    """The model's greedy continuation of each prompt: what locality should keep. Answers
    found are added to ``known``, and prompts already in it are not generated again."""
    known = {} if known is None else known
    for p in prompts:
        if p in known:
            continue
        ids = handle.tokenizer(p, return_tensors="pt")["input_ids"].to(next(handle.model.parameters()).device)
        gen = handle.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                    do_sample=False, pad_token_id=handle.tokenizer.pad_token_id)
        known[p] = handle.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True) or " ."
    return [known[p] for p in prompts]


def snapshot(handle, loc: LocalitySet) -> list[Scored]:
    """Teacher-forced predictions on the locality set, with next-token distributions."""
    return teacher_forced(handle.model, handle.tokenizer, loc.prompts, loc.answers, keep_next=True)


def locality(handle, loc: LocalitySet, before: list[Scored]) -> LocalityResult:
    """Compare the model now with the locality snapshot taken earlier."""
    tok = handle.tokenizer
    after = snapshot(handle, loc)
    rows = []
    agree = 0
    for p, b, a in zip(loc.prompts, before, after):
        bt, at = int(b.next_logp.argmax()), int(a.next_logp.argmax())
        agree += bt == at
        rows.append(ProbeRow(p, tok.decode([bt]), tok.decode([at]), bt != at))
    return LocalityResult(unchanged_share(before, after), agree / max(1, len(rows)),
                          kl_next(before, after), rows)


def probe(handle, prompt: str, target: str, paraphrases: list[str], loc: LocalitySet,
          before: list[Scored]) -> ProbeResult:
    """Measure an edit now in effect: its target, its paraphrases, and the locality snapshot."""
    model, tok = handle.model, handle.tokenizer
    rel = mean_accuracy(teacher_forced(model, tok, [prompt], [target]))
    gen = mean_accuracy(teacher_forced(model, tok, paraphrases, [target] * len(paraphrases))) if paraphrases else None
    moved = locality(handle, loc, before)
    return ProbeResult(rel, gen, moved.loc, moved.agree, moved.kl, moved.rows)


def probe_against_unedited(session) -> LocalityResult:
    """Loc, agreement and KL of the model now against the same model with no edits.

    Edits are taken out newest first and put back oldest first, which restores the
    model bit for bit.
    """
    with session.lock:
        loc = session.locality(exclude={e.subject for e in session.edits})
        patches = [e.patch for e in session.edits]
        for patch in reversed(patches):
            patch.revert()
        try:
            before = snapshot(session.handle, loc)
        finally:
            for patch in patches:
                patch.apply()
        return locality(session.handle, loc, before)


def reprobe(session, edit_id: str) -> ProbeResult:
    """Measure an edit in force again: its target and paraphrases now, and locality of the
    model now against the unedited one. The result replaces the edit's stored probe."""
    edit = session.ledger.get(edit_id)
    with session.lock:
        model, tok = session.model, session.tokenizer
        rel = mean_accuracy(teacher_forced(model, tok, [edit.prompt], [edit.target]))
        paras = list(edit.paraphrases)
        gen = mean_accuracy(teacher_forced(model, tok, paras, [edit.target] * len(paras))) if paras else None
        moved = probe_against_unedited(session)
    edit.probe = ProbeResult(rel, gen, moved.loc, moved.agree, moved.kl, moved.rows)
    return edit.probe
