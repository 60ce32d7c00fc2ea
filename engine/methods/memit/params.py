"""MEMIT's and AlphaEdit's hyperparameters, read from kedit.toml: [memit] / [alphaedit], then
the family's and the model's tables, each overriding the one before."""

from __future__ import annotations

from dataclasses import dataclass

from kedit.engine.methods import MethodParams


@dataclass(frozen=True)
class MemitParams(MethodParams):
    section = "memit"
    layers: tuple[int, ...] | None = None  # the layer range; None: ``span`` layers from tracing
    layer: int | None = None  # the top layer L (z's layer); with ``span`` it sets the range
    span: int = 5  # layers in the range (the papers' Llama settings: 4-8)
    below: int = 1  # with no layer given, the range starts this far below the traced layer
    v_steps: int = 25  # Adam steps on each fact's δ
    v_lr: float = 1.5
    v_weight_decay: float = 1e-3  # on ‖δ‖ / ‖h‖², as the reference code has it
    clamp_norm_factor: float = 1.0  # ‖δ‖ ≤ factor · ‖h‖, h the residual at L (kedit.toml says why)
    kl_factor: float = 0.0625  # KL on "{subject} is a"
    nll_stop: float = 0.05  # a fact's δ stops once its target's mean NLL is below this
    n_contexts: int = 2  # context prefixes the model writes itself (plus the bare prompt)
    context_tokens: int = 10
    # rows of the value optimisation run through the model at once. A group's rows are packed
    # into one sequence whose attention is masked, so its cost grows with the square of the group:
    # SmolLM2, 100 facts, 340 rows: 3.9 s a step at 20, 4.5 s at 64, 5.7 s at 10 (one unit each)
    rows_per_pass: int = 20
    stats_samples: int = 0  # C: as [rome] (0: enough for the key width)
    stats_tokens: int = 32
    # λ in λC + K Kᵀ is update_weight · d_in: a typical key then gets d/(λ + d) of its share at
    # each layer whatever the width (the papers' λ = 15,000 for GPT-J's 16,384-wide keys: 0.92)
    update_weight: float = 0.92
    identity_c: bool = False  # C = I, named as such

    def range_of(self, top: int, n_layers: int) -> tuple[int, ...]:
        """The layers edited when the top one is ``top``: ``layers`` unless a ``layer`` was given,
        else ``span`` layers ending at it."""
        if self.layers is not None and self.layer is None:
            return tuple(sorted(set(int(i) for i in self.layers)))
        return tuple(range(max(0, top - self.span + 1), top + 1))


@dataclass(frozen=True)
class AlphaEditParams(MemitParams):
    section = "alphaedit"
    stats_samples: int = 1600  # P needs many more tokens than the key width (51k for 1536-wide keys)
    null_threshold: float = 0.5  # eigenvalues of C below this times their mean span the null space
    l2: float = 10.0  # μ in the solve (the paper's 10), in units of C's mean eigenvalue
    # λ of MEMIT's preservation term on what P leaves of ordinary keys, times the key width as
    # update_weight is (0: the paper's AlphaEdit, which drops the term as P removes it all)
    preserve: float = 0.3
    # count that term from the unedited weights: each batch also takes back, on ordinary keys,
    # what the earlier AlphaEdit batches in force moved (solve.AlphaEditSolve.extra; kedit.toml)
    pullback: bool = False
    # fit the earlier batches' keys to their own batch's targets, rather than keep them as they
    # are now (solve.AlphaEditSolve.extra; kedit.toml)
    refit: bool = False
