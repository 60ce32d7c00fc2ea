"""MEMIT (Meng et al. 2023) and AlphaEdit (Fang et al. 2025): many facts in one least-squares
update, spread over a range of layers.

The steps, one module each:

- ``values``: for each fact, z = h + δ, the residual stream at the top layer L of the range at
  the subject's last token, with δ optimised (model frozen) so that the model says the target
  after the prompt and after context prefixes, with a KL term on "{subject} is a".
- ``keys``: each fact's key at each layer of the range (the MLP output projection's input at
  the subject's last token, averaged over the context prefixes), and the residual stream at L.
- ``solve``: layer by layer from the bottom, the residual z - h(now) is shared out over the
  layers left, and the layer's MLP output weight takes the change Δ that maps the keys K onto
  their share R:
  - MEMIT: Δ = R Kᵀ (λC + K Kᵀ)⁻¹, C the second moment of the layer's keys on ordinary text;
  - AlphaEdit: Δ = R Kᵀ P (P (K Kᵀ + Kₚ Kₚᵀ) P + μI)⁻¹, P the projection onto the directions
    ordinary text's keys do not use (C's eigenvectors with small eigenvalues) and Kₚ the keys of
    earlier AlphaEdit batches still in force. Δ k = 0 for every key P removes, so what the model
    knew is left alone, and earlier batches are kept by the Kₚ term.

Δ has rank at most the batch size, so it is kept as factors beside the layer (``patches``): it
works the same on 4-bit and 8-bit weights and reverts exactly.
"""
