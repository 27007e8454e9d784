"""fpbma: Flat-Posterior-aware Bayesian Model Averaging in JAX.

Posterior families with closed-form KL and Fisher products (:mod:`fpbma.posterior`), and FP-BMA as
composable optax transforms (:mod:`fpbma.transforms`); every training method behind one interface
(:mod:`fpbma.methods`, contracts in :mod:`fpbma.types`).
"""

from fpbma.posterior import (
    DiagGaussian,
    FlatLayout,
    LowRankGaussian,
    LowRankNoise,
    fisher_diagonal,
    fisher_vp,
    inverse_fisher_vp,
    kl_along_line,
    kl_divergence,
    log_prob,
    num_parameters,
    perturbation_kl,
    sample,
    sample_from_noise,
    sample_noise,
)
from fpbma.transforms import (
    SkipNonFiniteState,
    adversarial_perturbation,
    fisher_perturbation,
    fpbma,
    negative_elbo,
    on_flat_posterior,
    perturb_along_metric,
    perturb_along_score,
    perturb_in_kl_ball,
    released_perturbation,
    scale_by_inverse_fisher,
    skip_non_finite,
    vi,
)

__version__ = "0.1.0"

from fpbma import baselines, bma, calibration, methods, metrics, models, types  # noqa: E402  (build on the core above)

_LAZY_SUBMODULES = ("data", "flatness", "transfer", "parallel")


def __getattr__(name):
    # fpbma.data etc. without importing tensorflow-datasets at `import fpbma` time.
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"fpbma.{name}")
    raise AttributeError(f"module 'fpbma' has no attribute {name!r}")
