"""Merging steering vectors into one: linear, TIES, or orthogonalised."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kedit.engine.errors import KeditError
from kedit.engine.steering.vector import SteeringVector

MERGE_MODES = ("linear", "ties", "orthogonal")


def merge_vectors(
    vectors: Sequence[SteeringVector],
    weights: Sequence[float] | None = None,
    mode: str = "linear",
    density: float = 1.0,
) -> SteeringVector:
    """One vector from several, layer by layer (a layer missing from a vector counts as zero).

    - ``linear``: Σ wᵢ·vᵢ, exactly what racking them at strengths wᵢ adds.
    - ``ties``: TIES-merging of the wᵢ·vᵢ (trim to ``density``, elect each entry's sign,
      average the entries that agree with it).
    - ``orthogonal``: Gram–Schmidt in the order given; each vector keeps only its part
      orthogonal to the ones before it, so a direction they share is counted once.
    """
    from kedit.engine.merging import gram_schmidt, ties_merge

    if mode not in MERGE_MODES:
        raise KeditError(f"merge mode is one of {', '.join(MERGE_MODES)}, not {mode!r}")
    if len(vectors) < 2:
        raise KeditError("merging takes at least two vectors")
    weights = [1.0] * len(vectors) if weights is None else [float(w) for w in weights]
    if len(weights) != len(vectors):
        raise KeditError(f"{len(weights)} weights for {len(vectors)} vectors")
    if len({v.hidden_size for v in vectors}) > 1:
        raise KeditError(f"these vectors have different hidden sizes {sorted({v.hidden_size for v in vectors})}")
    families = {v.model_type for v in vectors if v.model_type}
    if len(families) > 1:
        raise KeditError(f"these vectors are for different model families: {', '.join(sorted(families))}")
    directions, norms = {}, {}
    for layer in sorted(set().union(*(v.layers for v in vectors))):
        parts = [(w, v.directions[layer].float()) for w, v in zip(weights, vectors) if layer in v.directions]
        if mode == "orthogonal":
            parts = list(zip([w for w, _ in parts], gram_schmidt([d for _, d in parts])))
        if mode == "ties":
            directions[layer] = ties_merge([w * d for w, d in parts], density)
        else:
            total = torch.zeros(vectors[0].hidden_size)
            for w, d in parts:
                total = total + w * d
            directions[layer] = total
        known = [v.norms[layer] for v in vectors if layer in v.norms]
        if known:
            norms[layer] = sum(known) / len(known)
    return SteeringVector(
        directions,
        families.pop() if families else "",
        vectors[0].hidden_size,
        f"merge:{mode}",
        norms,
        1.0,
        {"weights": weights, "density": density},
    )
