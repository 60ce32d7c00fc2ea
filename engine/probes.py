"""The probe run after every edit: what the edit changed, and what it left alone, by two protocols.

Generation-based (what a user sees; shown first): the model generates greedily to its own stop or
a small cap, and a hit means the target appears in what it wrote. Rel on the edit's prompt, Para
on its paraphrases, Chat on a question under the chat template (chat models; the answer must
name the subject too, so an answer about another subject does not count), and Loc: of the
unrelated prompts whose generation held its answer before the edit, the share that still do.

Teacher-forced (EasyEdit's definitions): Rel and Gen are token accuracy of the target after the
prompt and after its paraphrases; Loc is the share of argmax tokens on unrelated prompts'
answers left unchanged. Next-token agreement and KL compare the distribution right after each
unrelated prompt. One implementation of both: ``kedit.engine.metrics``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from kedit.engine.metrics import (
    Scored,
    chat_text,
    greedy,
    hit_share,
    kept_share,
    kl_next,
    mean_accuracy,
    mentions,
    teacher_forced,
    unchanged_share,
)

DEFAULT_LOCALITY = [
    "The capital of France is",
    "The Eiffel Tower is located in",
    "Water is made of hydrogen and",
    "The first president of the United States was",
    "The largest planet in the solar system is",
    "Python is a programming",
    "The Beatles were a band from",
    "Mount Everest is in",
    "The chemical symbol for gold is",
    "Shakespeare wrote",
    "The Great Wall is in",
    "Albert Einstein developed the theory of",
]


@dataclass
class LocalitySet:
    """Unrelated prompts and the answers to teacher-force (the model's own when not given).

    ``known`` keeps what was generated for this state of the model (answers, generations), so
    successive probes from one state do not generate them again."""

    prompts: list[str]
    answers: list[str]
    known: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class GenSettings:
    """Token caps of the generation-based protocol ([probes] in kedit.toml)."""

    tokens: int = 16  # a completion of the edit's prompt or a paraphrase
    chat_tokens: int = 48  # a chat answer
    locality_tokens: int = 10  # an unrelated prompt's answer

    @classmethod
    def from_config(cls, config) -> GenSettings:
        return cls(
            int(config.get("probes.gen_tokens", cls.tokens)),
            int(config.get("probes.chat_tokens", cls.chat_tokens)),
            int(config.get("probes.locality_gen_tokens", cls.locality_tokens)),
        )


@dataclass
class GenResult:
    """The generation-based figures of one edit, and what the model wrote."""

    rel: float | None  # the prompt's completion mentions the target
    para: float | None  # share of paraphrase completions that do
    chat: float | None  # the chat answer mentions the target and the subject
    loc: float | None  # unrelated prompts that still generate the answer they generated before
    outputs: dict[str, str] = field(default_factory=dict)  # prompt or question -> what was generated
    before: dict[str, str] = field(default_factory=dict)  # the same, written by the model before the edit
    hits: list[bool] = field(default_factory=list)  # per fact of a batch: its completion mentions the target
    # per fact of a batch that missed: (prompt, its completion) and ("chat: " question, the answer)
    missed: list[tuple[str, str]] = field(default_factory=list)


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
    gen_loc: float | None = None  # by generation: answers held before and still generated


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


@dataclass
class ProbeResult:
    """An edit's figures: teacher-forced (rel, gen, loc, agree, kl) and generation-based (``by_gen``)."""

    rel: float
    gen: float | None
    loc: float
    agree: float
    kl: float
    rows: list[ProbeRow] = field(default_factory=list)
    by_gen: GenResult | None = None

    def summary(self) -> str:
        text = ""
        if self.by_gen is not None:
            g = self.by_gen
            text = f"by generation: Rel {_f(g.rel)} · Para {_f(g.para)} · Chat {_f(g.chat)} · Loc {_f(g.loc)} | "
        return (
            text + f"teacher-forced: Rel {self.rel:.2f} · Gen {_f(self.gen)} · Loc {self.loc:.2f} · "
            f"next-token agree {self.agree:.2f} · KL {self.kl:.4f}"
        )

    def metrics(self) -> dict[str, float | None]:
        """Every figure by its name, the protocol in the name: ``gen_*`` by generation, ``tf_*``
        teacher-forced (``rel``, ``gen``, ``loc`` are the teacher-forced ones, EasyEdit's names)."""
        g = self.by_gen or GenResult(None, None, None, None)
        return {
            "gen_rel": g.rel,
            "gen_para": g.para,
            "gen_chat": g.chat,
            "gen_loc": g.loc,
            "tf_rel": self.rel,
            "tf_gen": self.gen,
            "tf_loc": self.loc,
            "rel": self.rel,
            "gen": self.gen,
            "loc": self.loc,
            "agree": self.agree,
            "kl": self.kl,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.metrics(),
            "rows": [vars(r) for r in self.rows],
            "outputs": dict(self.by_gen.outputs) if self.by_gen else {},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        rows = [ProbeRow(**r) for r in data.get("rows", [])]
        by_gen = None
        if any(data.get(k) is not None for k in ("gen_rel", "gen_para", "gen_chat", "gen_loc")):
            by_gen = GenResult(
                data.get("gen_rel"),
                data.get("gen_para"),
                data.get("gen_chat"),
                data.get("gen_loc"),
                dict(data.get("outputs", {})),
            )
        return cls(data["rel"], data["gen"], data["loc"], data["agree"], data["kl"], rows, by_gen)


def locality_set(
    handle, config, exclude_subjects: set[str], known: dict[tuple[str, str], str] | None = None
) -> LocalitySet:
    """The fact world's other facts, else kedit.toml's [probes] locality prompts with the model's
    own answers (``known`` holds what was already generated for this state of the model)."""
    n = int(config.get("probes.n_locality", 24))
    known = {} if known is None else known
    if handle.source.kind == "fact-world":
        from kedit.engine.factworld.build import BuildSettings

        world = BuildSettings.from_config(config.table("fact_world")).world()
        facts = [f for f in world.facts if f.subject not in exclude_subjects]
        picked = random.Random(0).sample(facts, min(n, len(facts)))  # every relation, fixed draw
        return LocalitySet([f.prompt(0) for f in picked], [f.target for f in picked], known)
    prompts = list(config.get("probes.locality", DEFAULT_LOCALITY))
    prompts = [p for p in prompts if not any(s in p for s in exclude_subjects)][:n]
    return LocalitySet(prompts, own_answers(handle, prompts, known=known), known)


def _generated(
    handle, prompts: list[str], tokens: int, kind: str, known: dict[tuple[str, str], str] | None
) -> list[str]:
    """Greedy continuations, taken from ``known`` where this state of the model already wrote them."""
    known = {} if known is None else known
    missing = [p for p in dict.fromkeys(prompts) if (kind, p) not in known]
    for p, text in zip(missing, greedy(handle.model, handle.tokenizer, missing, tokens)):
        known[(kind, p)] = text
    return [known[(kind, p)] for p in prompts]


def own_answers(
    handle, prompts: list[str], tokens: int = 3, known: dict[tuple[str, str], str] | None = None
) -> list[str]:
    """The model's greedy continuation of each prompt: what locality should keep."""
    return [a or " ." for a in _generated(handle, prompts, tokens, f"own{tokens}", known)]


def locality_generations(handle, loc: LocalitySet, settings: GenSettings) -> list[str]:
    """What the model generates after each locality prompt now (cached for this state)."""
    return _generated(handle, loc.prompts, settings.locality_tokens, f"gen{settings.locality_tokens}", loc.known)


def generations(
    handle, prompt: str, paraphrases: list[str], question: str | None, settings: GenSettings
) -> dict[str, str]:
    """What the model writes now after the prompt and each paraphrase, and (chat models) its
    answer to ``question`` (default: the prompt) as a chat turn, keyed "chat: QUESTION"."""
    model, tok = handle.model, handle.tokenizer
    texts = [prompt, *paraphrases]
    outputs = dict(zip(texts, greedy(model, tok, texts, settings.tokens, batch_size=1)))
    if handle.is_chat:
        ask = question or prompt
        outputs[f"chat: {ask}"] = greedy(model, tok, [chat_text(tok, ask)], settings.chat_tokens, special=False)[0]
    return outputs


def by_generation(
    handle,
    prompt: str,
    target: str,
    paraphrases: list[str],
    subject: str,
    question: str | None,
    settings: GenSettings,
    loc: LocalitySet | None = None,
    loc_before: list[str] | None = None,
) -> GenResult:
    """The generation-based figures of an edit in force. ``question`` defaults to the prompt sent
    as a chat turn (for chat models); ``loc_before`` are the locality generations before the edit."""
    model, tok = handle.model, handle.tokenizer
    outputs = generations(handle, prompt, paraphrases, question, settings)
    chat = None
    if handle.is_chat:
        chat = hit_share([outputs[f"chat: {question or prompt}"]], target, also=subject)
    kept = None
    if loc is not None and loc_before is not None and loc.prompts:
        kept = kept_share(loc.answers, loc_before, greedy(model, tok, loc.prompts, settings.locality_tokens))
    return GenResult(
        hit_share([outputs[prompt]], target), hit_share([outputs[p] for p in paraphrases], target), chat, kept, outputs
    )


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
        assert b.next_logp is not None and a.next_logp is not None  # snapshots keep the next token's log-probs
        bt, at = int(b.next_logp.argmax()), int(a.next_logp.argmax())
        agree += bt == at
        rows.append(ProbeRow(p, tok.decode([bt]), tok.decode([at]), bt != at))
    return LocalityResult(unchanged_share(before, after), agree / max(1, len(rows)), kl_next(before, after), rows)


def probe(
    handle,
    prompt: str,
    target: str,
    paraphrases: list[str],
    loc: LocalitySet,
    before: list[Scored],
    *,
    subject: str | None = None,
    question: str | None = None,
    settings: GenSettings | None = None,
    loc_before: list[str] | None = None,
) -> ProbeResult:
    """Measure an edit now in effect: its target, its paraphrases, and the locality snapshot,
    teacher-forced; and, given ``subject``, by generation as well."""
    model, tok = handle.model, handle.tokenizer
    rel = mean_accuracy(teacher_forced(model, tok, [prompt], [target]))
    gen = mean_accuracy(teacher_forced(model, tok, paraphrases, [target] * len(paraphrases))) if paraphrases else None
    moved = locality(handle, loc, before)
    by_gen = None
    if subject is not None:
        by_gen = by_generation(
            handle, prompt, target, paraphrases, subject, question, settings or GenSettings(), loc, loc_before
        )
    return ProbeResult(rel, gen, moved.loc, moved.agree, moved.kl, moved.rows, by_gen)


def probe_against_unedited(session) -> LocalityResult:
    """Loc (teacher-forced and by generation), agreement and KL of the model now against the
    same model with no edits.

    Edits are taken out newest first and put back oldest first, which restores the
    model bit for bit.
    """
    settings = GenSettings.from_config(session.config)
    handle = session.handle
    with session.lock:
        loc = session.locality(exclude={e.subject for e in session.edits})
        patches = [e.patch for e in session.edits]
        for patch in reversed(patches):
            patch.revert()
        try:
            before = snapshot(handle, loc)
            generated_before = greedy(handle.model, handle.tokenizer, loc.prompts, settings.locality_tokens)
        finally:
            for patch in patches:
                patch.apply()
        moved = locality(handle, loc, before)
        moved.gen_loc = kept_share(loc.answers, generated_before, locality_generations(handle, loc, settings))
        return moved


def reprobe(session, edit_id: str) -> ProbeResult:
    """Measure an edit in force again, by both protocols: its target, paraphrases and question
    now, and locality of the model now against the unedited one. The result replaces the
    edit's stored probe."""
    edit = session.ledger.get(edit_id)
    settings = GenSettings.from_config(session.config)
    with session.lock:
        model, tok = session.model, session.tokenizer
        if edit.is_batch:
            rel, gen, by_gen = batch_figures(session.handle, edit.facts, settings)
            moved = probe_against_unedited(session)
            by_gen.loc = moved.gen_loc
            edit.probe = ProbeResult(rel, gen, moved.loc, moved.agree, moved.kl, moved.rows, by_gen)
            return edit.probe
        rel = mean_accuracy(teacher_forced(model, tok, [edit.prompt], [edit.target]))
        paras = list(edit.paraphrases)
        gen = mean_accuracy(teacher_forced(model, tok, paras, [edit.target] * len(paras))) if paras else None
        by_gen = by_generation(session.handle, edit.prompt, edit.target, paras, edit.subject, edit.question, settings)
        moved = probe_against_unedited(session)
    by_gen.loc = moved.gen_loc
    edit.probe = ProbeResult(rel, gen, moved.loc, moved.agree, moved.kl, moved.rows, by_gen)
    return edit.probe


def batch_figures(handle, facts: list[dict[str, Any]], settings: GenSettings) -> tuple[float, float | None, GenResult]:
    """A batch's own figures now, each the share over its facts (``facts``: prompt, subject,
    target with its leading space, paraphrases, question): teacher-forced Rel and Gen, and by
    generation Rel over the prompts, Para over the paraphrases and Chat over the questions (chat
    models; the answer must name the subject too). Prompts are generated in left-padded batches.
    The GenResult's ``loc`` is left for the caller."""
    model, tok = handle.model, handle.tokenizer
    prompts = [f["prompt"] for f in facts]
    targets = [f["target"] for f in facts]
    paras = [(p, f["target"]) for f in facts for p in f.get("paraphrases", [])]
    rel = mean_accuracy(teacher_forced(model, tok, prompts, targets))
    gen = mean_accuracy(teacher_forced(model, tok, [p for p, _ in paras], [t for _, t in paras])) if paras else None
    said = greedy(model, tok, prompts, settings.tokens)
    hits = [mentions(s, t) for s, t in zip(said, targets)]
    para_said = greedy(model, tok, [p for p, _ in paras], settings.tokens) if paras else []
    para_hits = [mentions(s, t) for s, (_, t) in zip(para_said, paras)]
    chat = None
    outputs = dict(zip(prompts[:8], said[:8]))
    missed = [(p, s) for p, s, hit in zip(prompts, said, hits) if not hit]
    asked = [f for f in facts if f.get("question")] if handle.is_chat else []
    if asked:
        answers = greedy(
            model, tok, [chat_text(tok, f["question"]) for f in asked], settings.chat_tokens, special=False
        )
        chat_hits = [mentions(a, f["target"]) and mentions(a, f["subject"]) for a, f in zip(answers, asked)]
        chat = sum(chat_hits) / len(asked)
        missed += [(f"chat: {f['question']}", a) for f, a, hit in zip(asked, answers, chat_hits) if not hit]
        outputs.update({f"chat: {f['question']}": a for f, a in zip(asked[:4], answers[:4])})
    by_gen = GenResult(
        sum(hits) / len(hits) if hits else None,
        sum(para_hits) / len(para_hits) if para_hits else None,
        chat,
        None,
        outputs,
        hits=hits,
        missed=missed,
    )
    return rel, gen, by_gen


def probe_batch(
    handle,
    facts: list[dict[str, Any]],
    loc: LocalitySet,
    before: list[Scored],
    settings: GenSettings,
    loc_before: list[str] | None = None,
) -> ProbeResult:
    """Measure a batch of edits now in force: ``batch_figures``, and locality against the
    snapshot ``before`` (teacher-forced) and ``loc_before`` (by generation)."""
    model, tok = handle.model, handle.tokenizer
    rel, gen, by_gen = batch_figures(handle, facts, settings)
    moved = locality(handle, loc, before)
    if loc_before is not None and loc.prompts:
        by_gen.loc = kept_share(loc.answers, loc_before, greedy(model, tok, loc.prompts, settings.locality_tokens))
    return ProbeResult(rel, gen, moved.loc, moved.agree, moved.kl, moved.rows, by_gen)
