"""The steering vector: one direction per decoder block, with the model it fits and the
strength measured to be safe on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kedit.engine.errors import KeditError


@dataclass(frozen=True)
class Recommendation:
    """The largest strength found whose neutral-text perplexity stays within ``limit`` × the
    unsteered model's, both ways: a magnitude; +strength steers the vector's way, −strength
    the other."""

    strength: float
    limit: float  # allowed perplexity / unsteered perplexity
    ratio: float  # perplexity at +strength / unsteered
    opposite: float  # perplexity at −strength / unsteered
    tried: tuple[tuple[float, float], ...]  # (strength, ratio) in the order measured
    capped: bool = False  # even the search's largest strength stayed within the limit
    neutral: str = "built-in"  # where the neutral text came from

    def to_json(self) -> dict[str, Any]:
        return {
            "strength": self.strength,
            "limit": self.limit,
            "ratio": self.ratio,
            "opposite": self.opposite,
            "tried": [list(t) for t in self.tried],
            "capped": self.capped,
            "neutral": self.neutral,
        }

    @classmethod
    def from_json(cls, data: Any) -> Recommendation | None:
        """None for files without one (or with one this kedit cannot read)."""
        try:
            return cls(
                float(data["strength"]),
                float(data["limit"]),
                float(data["ratio"]),
                float(data["opposite"]),
                tuple((float(a), float(b)) for a, b in data.get("tried", ())),
                bool(data.get("capped", False)),
                str(data.get("neutral", "")),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def describe(self) -> str:
        """One line: the strength and what it costs, for /steer train, add and save."""
        bound = "at least " if self.capped else ""
        return (
            f"recommended strength {bound}±{self.strength:g}: neutral perplexity {self.ratio:.2f}× the "
            f"unsteered model's at +{self.strength:g}, {self.opposite:.2f}× at −{self.strength:g} "
            f"(limit {self.limit:g}×)"
        )


@dataclass
class SteeringVector:
    directions: dict[int, torch.Tensor]  # decoder block (0-based) -> (hidden,) float32
    model_type: str  # "" when the file did not say (EasyEdit2); then only the hidden size is checked
    hidden_size: int
    method: str
    norms: dict[int, float]  # mean norm of the block's output at the read positions; {} if unknown
    strength: float = 1.0  # the strength to rack it at: /steer save records the one in use
    meta: dict[str, Any] = field(default_factory=dict)
    recommended: Recommendation | None = None  # measured on the model at training; None if never measured

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def save(self, path: Path) -> Path:
        """One tensor per layer (``layer.L``) and JSON metadata, written atomically."""
        from kedit.engine.steering.io import save_safetensors

        return save_safetensors(self, path)

    @classmethod
    def load(cls, path: Path) -> SteeringVector:
        """A vector saved by ``save``; anything else is refused, saying why."""
        from kedit.engine.steering.io import load_safetensors

        directions, meta = load_safetensors(path)
        return cls(
            directions,
            meta["model_type"],
            int(meta["hidden_size"]),
            meta["method"],
            {int(k): float(v) for k, v in meta.get("norms", {}).items()},
            float(meta.get("strength", 1.0)),
            meta.get("meta", {}),
            Recommendation.from_json(meta.get("recommended")),
        )

    def check_sound(self, source: str) -> SteeringVector:
        """Refuse a vector whose own parts disagree: no layers, a direction that is not one
        vector of the stated hidden size, or a value that is NaN or infinite."""
        import math

        if not self.directions:
            raise KeditError(f"{source} holds no layers")
        for layer, d in self.directions.items():
            if d.dim() != 1 or d.numel() != self.hidden_size:
                raise KeditError(
                    f"{source}: layer {layer}'s direction has shape {tuple(d.shape)}, "
                    f"but the vector says hidden size {self.hidden_size}"
                )
            if not torch.isfinite(d).all():
                raise KeditError(f"{source}: layer {layer}'s direction holds NaN or infinite values")
        numbers = [self.strength, *self.norms.values()]
        if not all(math.isfinite(x) for x in numbers):
            raise KeditError(f"{source}: its strength or norms are NaN or infinite")
        return self

    def check_fits(self, handle) -> None:
        """Refuse a vector made for another hidden size or model family, saying which."""
        hidden = int(handle.model.config.hidden_size)
        if self.hidden_size != hidden:
            raise KeditError(
                f"this vector is for hidden size {self.hidden_size} ({self.model_type}); the loaded model has {hidden}"
            )
        if self.model_type and self.model_type != handle.adapter.model_type:
            raise KeditError(
                f"this vector was trained on a {self.model_type} model; the loaded one is {handle.adapter.model_type}"
            )
        n = handle.adapter.n_layers
        bad = [layer for layer in self.layers if not 0 <= layer < n]
        if bad:
            raise KeditError(f"this vector has layers {bad}, but the model has {n} (0-{n - 1})")
