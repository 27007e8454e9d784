"""SAM: w ← OuterSGD(w, ∇ℓ(w + ε*)), ε* = ρ g/‖g‖₂ (a Euclidean ball of radius rho); a point mass.

>>> from fpbma import methods
>>> methods.get("sam").defaults["rho"]
0.05

Reference: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021.
"""

from __future__ import annotations

from fpbma.baselines._sam import sam
from fpbma.methods import SCHEDULED, SEARCH_LEARNING_RATE, SEARCH_WEIGHT_DECAY, Method, register
from fpbma.methods._adapters import point
from fpbma.types import point_mass

SAM = register(Method(
    "sam", defaults=dict(rho=0.05, momentum=0.9, weight_decay=0.0, nesterov=False),
    build=lambda problem, hp, run: point(problem, sam(run.learning_rate, **hp), lambda s: point_mass(s.params)),
    shared=SCHEDULED,
    search_space={"learning_rate": SEARCH_LEARNING_RATE, "rho": ("log_uniform", 0.01, 0.5),
                  "weight_decay": SEARCH_WEIGHT_DECAY},
    summary="SAM (Euclidean ball of radius rho)"))
