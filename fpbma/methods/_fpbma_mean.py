"""FP-BMA with the KL ball over the means only: Δ* = ρ Σ g_μ/√(g_μᵀΣ g_μ) on μ, log σ and D unperturbed.

The ablation between FP-BMA and SAM. With small posterior variances the full ball's worst case is a
change of variance (the Fisher of the means, Σ⁻¹, dwarfs that of log σ), so FP-BMA's mean step is
negligible; this ball spends the whole budget KL = ρ²/2 on moving the means, a Mahalanobis-SAM step
(:func:`fpbma.fisher_perturbation` with ``blocks="mean"``). Everything else is FP-BMA's.

>>> from fpbma import methods
>>> methods.get("fpbma_mean").defaults["blocks"]
'mean'

Reference: Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664
(the KL ball this restricts).
"""

from __future__ import annotations

from fpbma.methods import Method, register
from fpbma.methods._fpbma import FPBMA, build_named

FPBMA_MEAN = register(Method(
    "fpbma_mean", defaults={**FPBMA.defaults, "blocks": "mean"}, build=build_named("fpbma_mean"),
    shared=FPBMA.shared,
    search_space=FPBMA.search_space,
    summary="FP-BMA with the KL ball over the means only (a Mahalanobis-SAM step on the means)"))
