"""ROME's hyperparameters, read from kedit.toml: [rome], then [rome.family.<model_type>], then
[rome.model."<hub id>"], each overriding the one before."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from kedit.engine.config import Config
from kedit.engine.methods import read_params


@dataclass(frozen=True)
class RomeParams:
    layer: int | None = None  # None: pick by causal tracing (cached per model)
    v_steps: int = 25  # Adam steps on δ
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3  # on ‖δ‖² / ‖v‖²
    kl_factor: float = 0.0625  # weight of KL on "{subject} is a"
    wording_kl: float = 1.0  # weight of KL on the prompt's own words after the subject (0: the paper)
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ factor · ‖v‖
    nll_stop: float = 0.05  # stop early once the target's mean NLL is below this
    n_contexts: int = 10  # context prefixes the model writes itself
    context_tokens: int = 10  # length of each prefix
    stats_samples: int = 1000  # texts for C
    stats_tokens: int = 128  # tokens per text
    ridge: float = 1e-2  # C + ridge·mean(diag C)·I: shrinkage for a finite sample
    identity_c: bool = False  # use C = I (no statistics), named as such

    @classmethod
    def from_config(cls, config: Config, model_type: str, model_id: str) -> RomeParams:
        return read_params(cls, config, "rome", model_type, model_id, skip=("trace_cases",))

    def with_(self, **changes: Any) -> RomeParams:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
