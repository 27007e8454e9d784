"""SGD / MAP fine-tuning (the "DNN" row): w ← w − η m, m ← μ m + ∇ℓ(w) + wd·w; the result is a point mass.

>>> from fpbma import methods
>>> sorted(methods.get("sgd").defaults)
['momentum', 'nesterov', 'weight_decay']

Reference: Robbins & Monro (1951); Polyak (1964) for momentum.
"""

from __future__ import annotations

from fpbma.baselines._sgd import sgd
from fpbma.methods import SCHEDULED, SEARCH_LEARNING_RATE, SEARCH_WEIGHT_DECAY, Method, register
from fpbma.methods._adapters import point
from fpbma.types import point_mass

SGD = register(Method(
    "sgd", defaults=dict(momentum=0.9, weight_decay=0.0, nesterov=False),
    build=lambda problem, hp, run: point(problem, sgd(run.learning_rate, **hp), lambda s: point_mass(s.params)),
    shared=SCHEDULED, search_space={"learning_rate": SEARCH_LEARNING_RATE, "weight_decay": SEARCH_WEIGHT_DECAY},
    summary="SGD with momentum (MAP point estimate)"))
