"""ROME's hyperparameters, read from kedit.toml: [rome], then [rome.family.<model_type>], then
[rome.model."<hub id>"], each overriding the one before."""

from __future__ import annotations

from dataclasses import dataclass

from kedit.engine.methods import MethodParams
from kedit.engine.methods.rome.phrasings import CHAT_ASKS


@dataclass(frozen=True)
class RomeParams(MethodParams):
    section = "rome"
    skip = ("trace_cases",)
    layer: int | None = None  # None: pick by causal tracing (cached per model)
    v_steps: int = 25  # Adam steps on δ
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3  # on ‖δ‖² / ‖v‖²
    kl_factor: float = 0.0625  # weight of KL on "{subject} is a"
    wording_kl: float = 1.0  # weight of KL on the prompt's own words after the subject (0: the paper)
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ factor · ‖v‖
    # a row's tokens before the first the update reaches by more than this share of δ are run
    # once and kept as the attention cache (value.prefix_cuts); 0: whole rows on every pass
    prefix_reach: float = 0.25
    nll_stop: float = 0.05  # stop early once the target's mean NLL is below this
    n_contexts: int = 5  # context prefixes the model writes itself
    context_tokens: int = 10  # length of each prefix
    stats_samples: int = 0  # texts for C; 0: enough for the key width (stats.auto_samples)
    stats_tokens: int = 32  # tokens per text
    ridge: float = 1e-2  # C + ridge·mean(diag C)·I: shrinkage for a finite sample
    identity_c: bool = False  # use C = I (no statistics), named as such
    # wordings beyond the prompt (kedit.engine.methods.rome.phrasings); 0 / False: the paper's ROME
    chat_asks: int = 2  # chat requests δ is also optimised under (chat models only): the first of chat_forms
    # their wordings, with {prompt}, {subject} and {question} (phrasings.question; skipped where the prompt has none)
    chat_forms: tuple[str, ...] = ("{question}", *CHAT_ASKS)
    restate_weight: float = 1.0  # weight of the NLL of the subject restated in those answers
    restate: str = "answer"  # what of the restated prompt that NLL reads: "subject" or the whole "answer"
    # a second key and value where the first key cannot read a subject that opens a text (see phrasings)
    opening: bool = False
    # ‖δ₂‖ ≤ factor · ‖v‖ for that value. SmolLM2: 2 and 4 cost other facts; 1.5 a capital asked
    # in chat after Ireland's edit (keyed at "land" in "I|re|land's"), 1.0 none, with the same paraphrases
    opening_clamp: float = 1.0
    # δ also optimised on that possessive wording ("The Netherlands's capital is") where the first
    # key reads the subject in it, so no second key is needed (phrasings.possessive)
    possessive: bool = False
    # the update gives none of δ to the keys of earlier edits in force on its layer (not the same
    # subject's: rome.method.earlier_keys), so that later edits do not move them; False: the paper
    keep_earlier: bool = True
    neighbours: int = 24  # other subjects in the prompt whose keys the update leaves alone
    neighbour_weight: float = 10.0  # their keys' weight against C's corpus
