"""Measuring a racked vector: the margin and perplexity at each strength of a sweep, and the
strength recommended for it (the largest that keeps neutral perplexity within a limit)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kedit.engine.errors import KeditError
from kedit.engine.metrics import NEUTRAL_TEXT
from kedit.engine.steering.rack import SteeringRack
from kedit.engine.steering.train import Pair
from kedit.engine.steering.vector import Recommendation, SteeringVector


@dataclass(frozen=True)
class SweepRow:
    strength: float
    margin: float  # mean log P(positive) − log P(negative) on the pairs
    perplexity: float  # on the neutral texts


def sweep(
    handle,
    rack: SteeringRack,
    name: str,
    strengths: Sequence[float],
    pairs: Sequence[Pair],
    neutral: Sequence[str],
    progress: Any = None,
) -> list[SweepRow]:
    """The racked vector ``name`` at each strength (on, at every position; the others as they
    are): the log-prob margin on ``pairs`` and the perplexity of ``neutral``. The slot is
    put back as it was, whatever happens."""
    from kedit.engine.metrics import logprob_margin, perplexity

    if not pairs:
        raise KeditError("the sweep needs contrastive pairs to measure the margin on")
    triples = [(p.prompt, p.positive, p.negative) for p in pairs]
    rows = []
    with rack.probing(name) as at:
        for strength in strengths:
            at(strength)
            rows.append(
                SweepRow(
                    float(strength),
                    logprob_margin(handle.model, handle.tokenizer, triples),
                    perplexity(handle.model, handle.tokenizer, neutral),
                )
            )
            if progress is not None:
                progress(f"strength {strength:g}", len(rows), len(strengths))
    return rows


# Plain English with no mood in it: what a steering vector should leave alone. Short, so that
# finding the recommended strength takes a few forward passes of a few hundred tokens.
SEARCH_UP, SEARCH_DOWN, BISECTIONS = 6, 16, 3  # doublings from 1 (to 64), halvings, narrowing steps


def _two_digits(x: float) -> float:
    """``x`` to two significant digits, so that every strength tried reads well."""
    return float(f"{x:.2g}")


@torch.no_grad()
def recommend_strength(
    handle,
    vector: SteeringVector,
    neutral: Sequence[str] = NEUTRAL_TEXT,
    limit: float = 1.2,
    source: str = "built-in",
    progress: Any = None,
) -> Recommendation:
    """The largest magnitude s whose ``neutral`` perplexity at +s and at −s stays within
    ``limit`` × the unsteered one (steering away from a mood can cost more than towards it).

    A grid doubling or halving from 1 brackets s, then geometric bisection narrows the
    bracket to a factor of about 1.09; every strength tried has two significant digits and
    the one returned was measured both ways. −s is measured only where +s passes. The vector
    is measured alone, in a rack of its own, on the model as it is (callers bypass their own).
    """
    from kedit.engine.metrics import perplexity

    if not limit > 1:
        raise KeditError(f"the perplexity limit is a ratio above 1 (e.g. 1.2), not {limit:g}")
    rack = SteeringRack(handle.model, handle.adapter)
    rack.add("probe", vector, 0.0)
    tried: list[tuple[float, float]] = []
    try:
        with rack.probing("probe") as at:
            base = perplexity(handle.model, handle.tokenizer, neutral)  # strength 0 leaves no hook

            def ratio(strength: float) -> float:
                at(strength)
                tried.append((strength, perplexity(handle.model, handle.tokenizer, neutral) / base))
                if progress is not None:
                    progress("finding the recommended strength", len(tried), max(len(tried) + 1, 12))
                return tried[-1][1]

            def within(strength: float) -> bool:
                return ratio(strength) <= limit and ratio(-strength) <= limit

            good, bad = _bracket(within)
            for _ in range(BISECTIONS):
                if not good or bad is None:
                    break
                mid = _two_digits((good * bad) ** 0.5)
                if not good < mid < bad:
                    break
                good, bad = (mid, bad) if within(mid) else (good, mid)
    except ValueError as exc:  # perplexity of texts too short to have a next token
        raise KeditError(f"the neutral text cannot be scored: {exc}") from None
    finally:
        rack.remove("probe")
    measured = dict(tried)
    return Recommendation(
        good, limit, measured.get(good, 1.0), measured.get(-good, 1.0), tuple(tried), bad is None, source
    )


def _bracket(within: Callable[[float], bool]) -> tuple[float, float | None]:
    """(largest strength within the limit, smallest beyond it) on a grid of powers of 2 from 1;
    (0, s) if even the smallest tried is beyond it, (s, None) if even the largest is within."""
    strength = 1.0
    if within(strength):
        for _ in range(SEARCH_UP):
            if not within(strength * 2):
                return strength, strength * 2
            strength *= 2
        return strength, None
    for _ in range(SEARCH_DOWN):
        lower = _two_digits(strength / 2)
        if within(lower):
            return lower, strength
        strength = lower
    return 0.0, strength
