"""WISE's settings (kedit.toml [wise])."""

from __future__ import annotations

from dataclasses import dataclass

from kedit.engine.methods.base import MethodParams
from kedit.engine.methods.rome.phrasings import CHAT_ASKS


@dataclass(frozen=True)
class WiseParams(MethodParams):
    section = "wise"
    layer: int | None = None  # None: layer_share of the way up the stack
    layer_share: float = 0.85  # the paper edits a mid-to-late layer (Llama-2-7B: 27 of 32)
    n_iter: int = 70
    lr: float = 1.0  # plain SGD, as published: gradients on weights are small
    weight_decay: float = 1e-5
    optimizer: str = "sgd"  # or "adam"
    nll_stop: float = 0.01
    margin_stop: float = 0.01  # stop once the NLL and the margin losses are both this small
    mask_ratio: float = 0.2  # share of D's entries each shard may change
    n_shards: int = 2
    ties_density: float = 1.0  # share of each shard's entries TIES keeps (1: no trimming)
    act_ratio: float = 0.88  # threshold = act_ratio × the lowest edit score
    alpha: float = 5.0  # irrelevant positions stay below
    beta: float = 20.0  # edit positions get above
    gamma: float = 10.0  # and the two means stay this far apart
    norm_constraint: float = 1.0  # |D| entries at most this
    n_irrelevant: int = 8  # model-written texts used as irrelevant inputs
    irrelevant_tokens: int = 16
    seed: int = 0  # for the shard masks
    edits_per_memory: int = 1000  # then a new side memory opens (WISE-Retrieve)
    # chat requests the edit is also trained under (chat models only), as ROME's value is: the
    # first chat_asks of chat_forms (kedit's addition; 0: the paper's WISE)
    chat_asks: int = 2
    chat_forms: tuple[str, ...] = CHAT_ASKS
    old_share: float = 0.5  # a new side memory scores older edits' inputs below this share of its own
