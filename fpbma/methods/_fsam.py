"""Fisher SAM: SAM in the ball εᵀ(I + η diag g²)ε ≤ ρ²; a point mass.

>>> from fpbma import methods
>>> methods.get("fsam").defaults["eta"]
1.0

Reference: Kim et al., "Fisher SAM: Information Geometry and Sharpness Aware Minimisation", ICML 2022.
"""

from __future__ import annotations

from fpbma.baselines._fsam import fsam
from fpbma.methods import SCHEDULED, SEARCH_LEARNING_RATE, SEARCH_WEIGHT_DECAY, Method, register
from fpbma.methods._adapters import point
from fpbma.types import point_mass

FSAM = register(Method(
    "fsam", defaults=dict(rho=0.1, eta=1.0, momentum=0.9, weight_decay=0.0, nesterov=False),
    build=lambda problem, hp, run: point(problem, fsam(run.learning_rate, **hp), lambda s: point_mass(s.params)),
    shared=SCHEDULED,
    search_space={"learning_rate": SEARCH_LEARNING_RATE, "rho": ("log_uniform", 0.01, 0.5),
                  "weight_decay": SEARCH_WEIGHT_DECAY},
    summary="Fisher SAM (ball measured by I + eta diag g^2)"))
