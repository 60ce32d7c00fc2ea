"""ROME (Meng et al. 2022) with the r-ROME correction (Gupta et al. 2024).

The steps of the paper, one module each: ``key`` (k*, the subject's key averaged over
context prefixes), ``value`` (v* = W k* + δ, δ optimised on the target), ``stats``
(C, the keys' second moment), ``update`` (the rank-one change Δ = δ (C⁻¹k*)ᵀ / k*ᵀC⁻¹k*).
r-ROME: the same averaged k* is used in the value's target and in the update.
"""
