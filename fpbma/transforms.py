"""FP-BMA as composable optax transforms.

FP-BMA (Lim et al., arXiv:2406.15664) minimises the worst-case negative ELBO over a KL ball around the
variational posterior q_θ:

    min_θ  max_{Δ : KL(q_{θ+Δ} ‖ q_θ) ≤ γ}  L(θ + Δ).

With KL(q_{θ+Δ} ‖ q_θ) ≈ ½ Δᵀ F_θ Δ and L linearised, the inner maximiser is the Fisher-weighted
adversarial perturbation (ρ = √(2γ), g = ∇_θ L(θ))

    Δ* = ρ F_θ⁻¹ g / √(gᵀ F_θ⁻¹ g),

and θ is updated with ∇_θ L(θ + Δ*). The pieces here:

* :func:`adversarial_perturbation` / :func:`perturb_along_metric` — the perturbation for any metric
  M (given by its inverse-vector product); M = I is SAM (Foret et al., 2021).
* :func:`fisher_perturbation` / :func:`perturb_in_kl_ball` — M = F_θ, the posterior's Fisher.
* :func:`scale_by_inverse_fisher` — the natural-gradient preconditioner F_θ⁻¹.
* :func:`skip_non_finite` — skips a step (θ and the inner state unchanged) when any gradient is
  non-finite, counting skips.
* :func:`released_perturbation` — the perturbation of the authors' released code (the normalised
  score of q per parameter block), an option of :func:`fpbma` for comparison, never the default.
* :func:`on_flat_posterior` — runs a transform on the posterior's fields concatenated into a few flat
  buffers (μ, log σ as P-vectors, D as a K × P matrix), so its traced size does not grow with the
  number of leaves; :func:`fpbma` and :func:`vi` run on it.
* :func:`fpbma` — the chain of all of them with optax's weight decay, momentum and learning rate;
  :func:`vi` — the same chain without the perturbation (plain VI, one gradient pass per step).

The perturbed pass runs inside ``update`` through a user-supplied ``grad_fn`` (optax.contrib.sam's
opaque mode), so side effects of the perturbed pass never reach the model state. Both passes should
use the same reparameterisation noise: close ``grad_fn`` over it (see :func:`fpbma`'s example).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fpbma import posterior as post

PyTree = Any
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

__all__ = [
    "adversarial_perturbation",
    "fisher_perturbation",
    "perturb_along_metric",
    "perturb_in_kl_ball",
    "perturb_along_score",
    "RADIUS_RULES",
    "scale_by_inverse_fisher",
    "skip_non_finite",
    "SkipNonFiniteState",
    "on_flat_posterior",
    "takes_flat_posterior",
    "fpbma",
    "vi",
    "PERTURBATIONS",
    "released_perturbation",
    "negative_elbo",
]


def _check_number(value, name, *, low=None, high=None, low_open=False, high_open=False):
    """Validates a hyperparameter when the transform is built; schedules (callables) pass through."""
    if callable(value):
        return
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}={value!r} must be a number.") from None
    conditions = []
    if low is not None:
        conditions.append((x > low if low_open else x >= low, f"{'>' if low_open else '>='} {low}"))
    if high is not None:
        conditions.append((x < high if high_open else x <= high, f"{'<' if high_open else '<='} {high}"))
    if not np.isfinite(x) or not all(ok for ok, _ in conditions):
        rule = " and ".join(text for _, text in conditions)
        raise ValueError(f"{name}={value!r} is invalid: it must be a finite number{' ' + rule if rule else ''}.")


def _tree_vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def adversarial_perturbation(g: PyTree, rho, inverse_metric_g: PyTree) -> PyTree:
    """Δ* = ρ M⁻¹ g / √(gᵀ M⁻¹ g): the maximiser of gᵀΔ subject to ½ Δᵀ M Δ ≤ ρ²/2.

    Args:
      g: the gradient (any pytree).
      rho: the radius ρ.
      inverse_metric_g: M⁻¹ g, a tree shaped like ``g``.

    Returns:
      Δ*, shaped like ``g``; zero where g = 0.
    """
    quad = _tree_vdot(g, inverse_metric_g)
    scale = jnp.where(quad > 0, rho / jnp.sqrt(jnp.where(quad > 0, quad, 1.0)), 0.0)
    return jax.tree.map(lambda x: (scale * x).astype(x.dtype), inverse_metric_g)


RADIUS_RULES = ("exact_kl", "second_order")


def _check_radius_rule(radius, radius_steps):
    if radius not in RADIUS_RULES:
        raise ValueError(f"radius={radius!r} is not a radius rule; use one of {RADIUS_RULES} "
                         "('exact_kl' puts q_{θ+Δ} on the true KL ball, 'second_order' is the paper's formula).")
    if isinstance(radius_steps, bool) or not isinstance(radius_steps, (int, np.integer)) or radius_steps < 2:
        raise ValueError(f"radius_steps={radius_steps!r} must be an integer >= 2 (KL evaluations of the radius "
                         "search: at least one secant step and the final Newton step).")


def _log_bisect(fn, lo, hi, iterations=60):
    """The root of an increasing scalar function between exp(lo) and exp(hi), by bisection in log space."""
    def body(_, bounds):
        lo_, hi_ = bounds
        mid = 0.5 * (lo_ + hi_)
        up = fn(jnp.exp(mid)) > 0
        return jnp.where(up, lo_, mid), jnp.where(up, mid, hi_)
    lo, hi = jax.lax.fori_loop(0, iterations, body, (lo, hi))
    return 0.5 * (lo + hi)


def _first_step(tau0, phi0, a, target):
    """log τ solving the model a τ² + ½ h(z τ²/τ₀²) = target, h(y) = y − log(1 + y), fitted at (τ₀, φ₀).

    The model is the KL along a step that is quadratic in the means and log σ (coefficient a, known)
    plus the exact KL of a change D Dᵀ → D Dᵀ + τ² E Eᵀ at D = 0 in one direction, which is quartic for
    small steps and quadratic again for large ones: ½ Σₖ h(yₖ), yₖ ∝ τ². All scalar work.
    """
    h = lambda y: y - jnp.log1p(y)
    rest = jnp.maximum(phi0 - a * tau0 * tau0, 0.0)
    z = jnp.exp(_log_bisect(lambda y: h(y) - 2.0 * rest, jnp.log(1e-30), jnp.log(1e30)))
    z = jnp.where(rest > 0, z, 0.0)
    model = lambda t: a * t * t + 0.5 * h(z * (t / tau0) ** 2) - target
    span = 70.0 if tau0.dtype == jnp.float64 else 30.0
    return _log_bisect(model, jnp.log(tau0) - span, jnp.log(tau0) + span)


def _solve_log_log(kl_fn, tau0, target, steps: int, quadratic=None, cheap_kl=None):
    """τ with kl_fn(τ) ≈ target: safeguarded secant on u = log τ ↦ ψ(u) = log kl_fn(e^u), ``steps`` evaluations.

    The first step fits the model of :func:`_first_step` through the first point, with a = ``quadratic``
    (the second-order coefficient, ½ dᵀF d): exact for a quadratic KL and for a step in zero deviation
    columns, whose KL is quartic for small steps and quadratic again for large ones. Without
    ``quadratic`` it assumes slope 2 in log-log. ``cheap_kl`` (the KL's mean and diagonal part, exact
    and elementwise) gives a second first step, Newton with its exact log-log slope, which sees the
    exponential growth e^{2τr} of a large log σ step that the model misses; the shorter of the two
    steps is taken. Later steps take the secant through the last two points. Every point with ψ above
    or below the target tightens a bracket; a secant step that leaves the bracket is replaced by its
    log-midpoint. A non-finite KL counts as too large, an underflowed one
    as too small (τ ÷ or × 100 while unbracketed). Fixed-length and branch-free, so jit, vmap and pmap
    trace it as straight-line code.
    """
    log_target = jnp.log(target)
    u = jnp.log(tau0)
    inf = jnp.asarray(jnp.inf, u.dtype)
    lo_u, hi_u = -inf, inf
    prev_u = prev_psi = None
    for _ in range(steps):
        phi = kl_fn(jnp.exp(u))
        finite = jnp.isfinite(phi) & (phi > 0)
        psi = jnp.where(finite, jnp.log(jnp.where(finite, phi, 1.0)), jnp.where(jnp.isfinite(phi), -inf, inf))
        big = psi > log_target
        hi_u = jnp.where(big, jnp.minimum(hi_u, u), hi_u)
        lo_u = jnp.where(big, lo_u, jnp.maximum(lo_u, u))
        slope = jnp.asarray(2.0, u.dtype)
        if prev_u is None and quadratic is not None:
            fitted = _first_step(jnp.exp(u), phi, jnp.maximum(quadratic, 0.0), target)
            use_fit = finite & jnp.isfinite(fitted) & (fitted != u)
            # Express the fitted τ as a slope so the bracketing below treats both steps alike.
            slope = jnp.where(use_fit, (log_target - jnp.where(finite, psi, 0.0)) / jnp.where(use_fit, fitted - u, 1.0),
                              slope)
            if cheap_kl is not None:
                tau = jnp.exp(u)
                c, dc = jax.jvp(cheap_kl, (tau,), (jnp.ones_like(tau),))
                cheap_slope = tau * dc / jnp.where(c > 0, c, 1.0)
                usable = jnp.isfinite(cheap_slope) & (cheap_slope > 0)
                slope = jnp.where(usable & (slope > 0), jnp.maximum(slope, jnp.where(usable, cheap_slope, 0.0)), slope)
        if prev_u is not None:
            ok = finite & jnp.isfinite(prev_psi) & (u != prev_u) & (psi != prev_psi)
            secant = (psi - prev_psi) / jnp.where(ok, u - prev_u, 1.0)
            slope = jnp.where(ok & (secant > 0), secant, slope)
        step = jnp.where(finite, (log_target - jnp.where(finite, psi, 0.0)) / slope,
                         jnp.where(psi > 0, -math.log(100.0), math.log(100.0)))
        proposal = u + step
        bracketed = jnp.isfinite(lo_u) & jnp.isfinite(hi_u)
        inside = (proposal > lo_u) & (proposal < hi_u)
        proposal = jnp.where(inside | ~bracketed, proposal, 0.5 * (lo_u + hi_u))
        # A converged point stays put: the secant through two nearly equal points is 0/0.
        converged = finite & (jnp.abs(psi - log_target) < 1e-6)
        prev_u, prev_psi = u, psi
        u = jnp.where(converged, u, proposal)
    return jnp.exp(u)


BLOCKS = ("all", "mean")
"""Which parameters the KL ball perturbs: every block of θ (the paper), or the means only."""


def _check_blocks(blocks):
    if blocks not in BLOCKS:
        raise ValueError(f"blocks={blocks!r} is not a perturbation block choice; use one of {BLOCKS} "
                         "('all': the paper's ball over every parameter of q, 'mean': the means only).")


def _mean_block(g):
    """``g`` with every block but the means zeroed (the ball restricted to the means)."""
    return type(g)(*[field if name == "mean" else jax.tree.map(jnp.zeros_like, field)
                     for name, field in zip(g._fields, g)])


def fisher_perturbation(q, g, rho, damping: float = 0.0, radius: str = "exact_kl", radius_steps: int = 4,
                        blocks: str = "all"):
    """The Fisher-weighted adversarial perturbation of a posterior's parameters.

    The direction is the second-order maximiser of gᵀΔ over the KL ball, d = F_λ⁻¹ g (F the Fisher of q in
    its own parameters, ``damping`` λ added to its covariance block, see :func:`fpbma.inverse_fisher_vp`).
    ``radius`` chooses the step along it:

    * ``"second_order"`` (the paper's formula): Δ* = ρ d / √(gᵀ d), on the ellipsoid ½ Δᵀ F_λ Δ = ρ²/2,
      i.e. KL(q_{θ+Δ} ‖ q_θ) ≈ γ = ρ²/2 to second order.
    * ``"exact_kl"`` (default): Δ* = τ d with τ solving KL(q_{θ+τd} ‖ q_θ) = ρ²/2 on the closed-form KL
      (:func:`fpbma.kl_along_line`) with ``radius_steps`` KL evaluations from the second-order
      τ₀ = ρ/√(gᵀd): a fitted first step, safeguarded secant steps in log τ, and a final Newton step.

    ``blocks="mean"`` restricts the ball to the means (log σ and D are not perturbed). A Gaussian's
    Fisher is block-diagonal between μ and the covariance parameters, so the direction is then
    d = (Σ g_μ, 0, 0) and the KL of the step is exactly ½ τ² g_μᵀΣg_μ: Δ* = ρ Σ g_μ/√(g_μᵀΣg_μ), a
    Mahalanobis-SAM step on the means, for both radius rules. Why it exists: with small posterior
    variances (σ ≈ 0.01) the Fisher of the means, Σ⁻¹, is 10³–10⁴ times that of log σ, so the full ball's
    worst case is almost entirely a change of variance and its mean step is negligible; the mean-only
    ball spends the whole budget γ on moving the means.

    Why the default is not the paper's formula: the second-order ball is the true ball only where the KL
    is quadratic over the step. For a LowRankGaussian whose deviation columns D are zero (``from_point``,
    the new head of the transfer scheme) ∂Σ/∂D = 0, so the Fisher of D vanishes, F_λ⁻¹ is 1/λ there and
    almost all of gᵀF_λ⁻¹g sits in D; but the KL of a step E in D grows like ‖E‖⁴/σ⁴, not ‖E‖², and the
    second-order Δ* lands ~10⁶ γ away. The same happens for columns much smaller than σ. Fixing τ on
    the real KL keeps q_{θ+Δ*} on the ball for every posterior; where the second-order ball is accurate
    (D of the size of σ or larger, a DiagGaussian at moderate ρ) τ ≈ ρ/√(gᵀd) and both rules agree.
    The cost is ``radius_steps`` evaluations of the KL along the line, O(P K²) each: one elementwise
    pass over θ for small steps, two K × K Gram products otherwise. The last is a Newton step with the
    exact slope, so autodiff through Δ* sees the implicit-function derivative of τ.

    Args:
      q: a DiagGaussian or LowRankGaussian.
      g: ∇_θ L, a tree shaped like q.
      rho: radius ρ ≥ 0, in √nats: the ball is KL ≤ ρ²/2.
      damping: λ ≥ 0 added to the covariance-block Fisher.
      radius: ``"exact_kl"`` or ``"second_order"``.
      radius_steps: KL evaluations of the ``"exact_kl"`` radius search (≥ 2).
      blocks: ``"all"`` (the paper's ball) or ``"mean"`` (the means only).

    Returns:
      Δ*, a tree shaped like q; zero where g = 0.

    >>> import fpbma, jax, jax.numpy as jnp
    >>> q = fpbma.LowRankGaussian.from_point({"w": jnp.zeros((4, 3))}, std=0.01, rank=3)  # D = 0
    >>> g = jax.tree.map(jnp.ones_like, q)
    >>> d = fpbma.fisher_perturbation(q, g, 0.5, damping=1e-3)
    >>> bool(abs(fpbma.perturbation_kl(q, d) / 0.125 - 1) < 0.05)  # on the ball KL = ρ²/2
    True
    >>> d2 = fpbma.fisher_perturbation(q, g, 0.5, damping=1e-3, radius="second_order")
    >>> bool(fpbma.perturbation_kl(q, d2) > 1e4 * 0.125)  # the paper's formula leaves it here
    True

    References:
      Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664.
    """
    _check_radius_rule(radius, radius_steps)
    _check_blocks(blocks)
    post._validate_like(q, g, "g")
    # All of it on flat buffers (θ as P-vectors and a K × P matrix), split back into leaves once at the end.
    layout, q, g = post._flatten(q, g)
    return post._unflatten(layout, _flat_fisher_perturbation(q, g, rho, damping, radius, radius_steps, blocks))


def _flat_fisher_perturbation(q, g, rho, damping, radius, radius_steps, blocks):
    """:func:`fisher_perturbation` for q and g already flat (one-leaf fields: P-vectors, D as K × P)."""
    if blocks == "mean":
        g = _mean_block(g)
    direction = post.inverse_fisher_vp(q, g, damping)
    if radius == "second_order":
        return adversarial_perturbation(g, rho, direction)
    quad = _tree_vdot(g, direction)
    rho = jnp.asarray(rho, quad.dtype)
    positive = (quad > 0) & (rho > 0)
    tau0 = rho / jnp.sqrt(jnp.where(positive, quad, 1.0))
    mean_quad = _tree_vdot(g.mean, direction.mean)  # d_μᵀΣ⁻¹d_μ = g_μᵀΣg_μ, a forward product
    line_kl = post.kl_along_line(q, direction, mean_quad=mean_quad)
    # Second-order coefficient of the KL along d: ½ dᵀF d = ½ (gᵀd − λ‖d_cov‖²), F undamped.
    cov_sq = sum(jnp.vdot(x, x) for name, field in zip(direction._fields, direction) if name != "mean"
                 for x in jax.tree_util.tree_leaves(field))
    quadratic = 0.5 * jnp.maximum(quad - damping * cov_sq, 0.0)
    target = jnp.where(positive, 0.5 * rho * rho, 1.0)
    sg = jax.lax.stop_gradient
    # The search itself is not differentiated (same values under jit: XLA shares the two line KLs' work).
    search_kl = post.kl_along_line(sg(q), sg(direction), mean_quad=sg(mean_quad))
    cheap_kl = post.kl_along_line(post.DiagGaussian(sg(q.mean), sg(q.log_std)),
                                  post.DiagGaussian(sg(direction.mean), sg(direction.log_std)),
                                  mean_quad=sg(mean_quad))
    tau = _solve_log_log(search_kl, sg(jnp.where(positive, tau0, 1.0)), sg(target), radius_steps - 1, sg(quadratic),
                         cheap_kl if isinstance(q, post.LowRankGaussian) else None)
    tau = _newton_in_log_log(line_kl, sg(tau), target)
    tau = jnp.where(positive, tau, 0.0)
    return jax.tree.map(lambda x: (tau * x).astype(x.dtype), direction)


def _newton_in_log_log(kl_fn, tau, target):
    """One Newton step on log kl(τ) = log target with the exact slope, from a τ near the root.

    Its value refines τ; its derivative with respect to θ (through kl_fn) is −τ ∂_θ log kl / (∂ log kl /
    ∂ log τ), the implicit-function derivative of the root, so autodiff through a step is exact.
    """
    phi, dphi = jax.jvp(kl_fn, (tau,), (jnp.ones_like(tau),))
    slope = jax.lax.stop_gradient(tau * dphi / jnp.where(phi > 0, phi, 1.0))
    ok = jnp.isfinite(phi) & (phi > 0) & jnp.isfinite(slope) & (slope > 0)
    step = (jnp.log(target) - jnp.log(jnp.where(ok, phi, 1.0))) / jnp.where(ok, slope, 1.0)
    return tau * jnp.exp(jnp.where(ok, jnp.clip(step, -1.0, 1.0), 0.0))


class PerturbState(NamedTuple):
    """Stateless; kept as a named type so chained states are readable."""


def perturb_along_metric(
    rho: float,
    inverse_metric_vp: Callable[[PyTree, PyTree], PyTree],
    batch_axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
    """Replaces the gradient g at θ by the gradient at θ + Δ*, Δ* = ρ M⁻¹g/√(gᵀM⁻¹g).

    ``update(g, state, params, *, grad_fn)`` calls ``grad_fn(params + Δ*)`` and returns its result
    (averaged over ``batch_axis_name`` under pmap, as is the incoming gradient, so every device
    perturbs identically). With ``inverse_metric_vp = lambda params, g: g`` this is SAM's perturbation.

    Args:
      rho: radius ρ ≥ 0 (ρ = 0 evaluates the gradient again at θ).
      inverse_metric_vp: ``(params, g) -> M⁻¹ g``.
      batch_axis_name: pmap axis to average gradients over, or None.
    """
    return _perturb_by(rho, lambda params, g, _: adversarial_perturbation(g, rho, inverse_metric_vp(params, g)),
                       batch_axis_name)


def _perturb_by(rho, perturbation: Callable[..., PyTree],
                batch_axis_name: Optional[str]) -> optax.GradientTransformationExtraArgs:
    """The opaque-mode transform: g ↦ grad_fn(θ + perturbation(θ, g, extra_args)), g pmean-ed over the batch axis.

    ``perturbation(params, g, extra_args)`` gets the extra arguments of ``update`` but ``grad_fn`` (a dict).
    """
    _check_number(rho, "rho", low=0.0)

    def init_fn(params):
        del params
        return PerturbState()

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        if params is None:
            raise ValueError("This transform needs the current parameters: call update(grads, state, params, grad_fn=...).")
        if grad_fn is None:
            raise ValueError("This transform evaluates the gradient at the perturbed point itself: pass "
                             "grad_fn=lambda params: <gradient of the loss at params> to update().")
        if batch_axis_name is not None:
            updates = jax.lax.pmean(updates, axis_name=batch_axis_name)
        delta = perturbation(params, updates, extra_args)
        perturbed = jax.tree.map(jnp.add, params, delta)
        adv_grads = grad_fn(perturbed)
        if batch_axis_name is not None:
            adv_grads = jax.lax.pmean(adv_grads, axis_name=batch_axis_name)
        return adv_grads, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def perturb_in_kl_ball(rho: float, damping: float = 0.0, batch_axis_name: Optional[str] = None,
                       radius: str = "exact_kl", radius_steps: int = 4,
                       blocks: str = "all") -> optax.GradientTransformationExtraArgs:
    """FP-BMA's inner maximisation: gradient at θ + Δ*, Δ* = :func:`fisher_perturbation` (q, g, ρ).

    Params passed to ``update`` must be a posterior (DiagGaussian / LowRankGaussian).

    Args:
      rho: radius ρ = √(2γ) of the KL ball KL(q_{θ+Δ} ‖ q_θ) ≤ γ.
      damping: λ ≥ 0 added to the covariance-block Fisher.
      batch_axis_name: pmap axis to average gradients over, or None.
      radius: ``"exact_kl"`` (Δ* on the true KL ball, the default) or ``"second_order"`` (the paper's
        ρ F⁻¹g/√(gᵀF⁻¹g)); see :func:`fisher_perturbation`.
      radius_steps: KL evaluations of the exact-radius search.
      blocks: ``"all"`` (every parameter of q, the paper) or ``"mean"`` (the ball over the means only).
    """
    _check_number(damping, "damping", low=0.0)
    _check_blocks(blocks)
    _check_radius_rule(radius, radius_steps)
    return _perturb_by(rho, lambda q, g, _: fisher_perturbation(q, g, rho, damping, radius, radius_steps, blocks),
                       batch_axis_name)


PERTURBATIONS = ("fisher", "released")


def _check_perturbation(perturbation):
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation={perturbation!r} is not a perturbation; use one of {PERTURBATIONS} ('fisher' "
                         "is FP-BMA's F⁻¹g on the KL ball, 'released' the authors' code's normalised score).")


def released_perturbation(q, w, rho) -> PyTree:
    """The perturbation of the authors' released code: the score of q at a sample, normalised per block.

    For each parameter block k of q (``mean``, ``log_std`` and, for a LowRankGaussian, ``cov_factor``)

        s_k = ∇_{θ_k} log q_θ(w),    ε_k = ρ s_k / (‖s_k‖₂ + 10⁻¹²),

    with w held fixed (the sampled weights of the step, not differentiated through the
    reparameterisation). Each block is normalised on its own, so every block of ε has norm ρ (a
    Euclidean radius per block, not a KL radius) and the loss gradient plays no part. It is not the
    maximiser of FP-BMA's inner problem (:func:`fisher_perturbation`); it is here to compare with the
    released code's behaviour.

    The density is q's own, :func:`fpbma.log_prob` (Σ = ½(diag σ² + DDᵀ/(K−1)) for a
    LowRankGaussian). The released code scores N(μ, diag(e^{log σ}) + DᵀD) instead (σ used as a
    variance, no ½ and no 1/(K−1)); this function does not reproduce that.

    Args:
      q: a DiagGaussian or LowRankGaussian.
      w: weights shaped like ``q.mean`` (e.g. ``fpbma.sample_from_noise(q, noise)`` with the step's noise).
      rho: ρ ≥ 0, the norm of each block of the perturbation.

    Returns:
      ε, a tree shaped like q; a block whose score is 0 gets ε_k = 0.

    >>> import fpbma, jax, jax.numpy as jnp
    >>> q = fpbma.DiagGaussian({"w": jnp.zeros(3)}, {"w": jnp.zeros(3)})
    >>> eps = fpbma.released_perturbation(q, {"w": jnp.array([1.0, 0.0, 0.0])}, 0.1)
    >>> [round(float(x), 4) for x in eps.mean["w"]]  # s_μ = Σ⁻¹(w − μ) = (1, 0, 0)
    [0.1, 0.0, 0.0]

    References:
      Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664 (the
      method), and its released code (this perturbation).
    """
    score = jax.grad(lambda q_: post.log_prob(q_, w))(q)

    def normalised(block):
        norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(block)))
        return jax.tree.map(lambda x: (rho * x / (norm + 1e-12)).astype(x.dtype), block)

    return type(q)(*[normalised(block) for block in score])


def perturb_along_score(rho: float, batch_axis_name: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
    """Gradient at θ + ε, ε = :func:`released_perturbation` (q, w, ρ) at the step's sample w.

    ``update(g, state, q, *, grad_fn, noise)``: ``noise`` is the step's reparameterisation noise (the
    one ``grad_fn`` samples with); w = ``fpbma.sample_from_noise(q, noise)``. ``g`` is not used by the
    perturbation (only pmean-ed under ``batch_axis_name``, as in every perturbation here).
    """

    def perturbation(q, g, extra_args):
        del g
        noise = extra_args.get("noise")
        if noise is None:
            raise ValueError("perturbation='released' perturbs along the score at the step's sample: pass "
                             "noise=<the step's reparameterisation noise, fpbma.sample_noise(q, key)> to update().")
        return released_perturbation(q, post.sample_from_noise(q, noise), rho)

    return _perturb_by(rho, perturbation, batch_axis_name)


def scale_by_inverse_fisher(damping: float = 0.0) -> optax.GradientTransformation:
    """Natural-gradient preconditioning in the posterior's parameters: g ↦ F_θ⁻¹ g.

    For DiagGaussian this is (σ² g_μ, g_logσ/2): natural-gradient VI (Khan & Rue, 2023) in the
    (μ, log σ) coordinates. For LowRankGaussian the mean block is exact (Σ g_μ), the covariance block
    uses the exact Fisher diagonal plus ``damping``.
    """
    _check_number(damping, "damping", low=0.0)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_inverse_fisher needs the current posterior: call update(grads, state, params).")
        return post.inverse_fisher_vp(params, updates, damping), state

    return optax.GradientTransformation(init_fn, update_fn)


class SkipNonFiniteState(NamedTuple):
    """State of :func:`skip_non_finite`.

    Attributes:
      inner_state: the wrapped transform's state (unchanged by a skipped step).
      num_skipped: int32 count of skipped steps.
    """

    inner_state: Any
    num_skipped: jax.Array


def all_finite(tree) -> jax.Array:
    """Whether every leaf of ``tree`` is finite, as one reduction over the concatenated leaves."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    # One reduction over the concatenated leaves (XLA fuses the concatenation into it): a reduction per leaf
    # compiles one kernel per leaf of every field.
    return jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(x) for x in leaves])))


def skip_non_finite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner``; if its input or output updates contain NaN/inf, returns zero updates and the old state.

    Unlike ``optax.apply_if_finite``, the *output* is checked as well, so a non-finite gradient of the
    perturbed pass (computed inside ``inner``) is caught too. A skipped step leaves the parameters
    unchanged (θ + 0) and increments ``num_skipped``.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNonFiniteState(inner.init(params), jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        ok = jnp.logical_and(all_finite(updates), all_finite(new_updates))
        # One conditional, not a jnp.where per leaf: per-leaf selects tie every output to both passes'
        # gradients and made XLA:CPU compile FP-BMA steps 2-2.5x slower (ResNet-20: 69 s -> 28 s).
        new_updates, new_inner = jax.lax.cond(
            ok, lambda: (new_updates, new_inner),
            lambda: (jax.tree.map(jnp.zeros_like, new_updates), state.inner_state))
        return new_updates, SkipNonFiniteState(new_inner, state.num_skipped + (1 - ok.astype(jnp.int32)))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _flat_noise(layout, noise):
    """The step's reparameterisation noise (``sample_noise``) in the flat layout of ``layout``."""
    if isinstance(noise, post.LowRankNoise):
        return post.LowRankNoise(diag=layout.ravel(noise.diag), rank=noise.rank)
    return layout.ravel(noise)


def on_flat_posterior(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` on the posterior with every field concatenated into one flat buffer.

    A posterior over L weight arrays is a tree of 2L (DiagGaussian) or 3L (LowRankGaussian) leaves, and a
    transform written leaf by leaf traces into L copies of each of its operations: XLA compiles every
    copy on its own, so compile time grows with the depth of the network. Here ``update`` concatenates
    the fields of the gradient and of θ once, μ and log σ into P-vectors and D into one K × P matrix
    (a one-leaf posterior of the same family), runs ``inner`` on them, and splits the result back into
    the leaves once. The values are those of ``inner`` on the tree up to float summation order; the
    state of ``inner`` (momentum, say) is held flat. ``grad_fn`` (see :func:`perturb_in_kl_ball`) is
    called on the tree, its gradient flattened; a ``noise`` argument is flattened too.

    Trees whose leaves have different dtypes (a flat buffer has one) and posteriors already flat are
    passed to ``inner`` as they are.

    Args:
      inner: a transform of posterior-shaped updates (DiagGaussian / LowRankGaussian).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``init`` and ``update`` take the tree-shaped
      posterior, ``update`` returns tree-shaped updates.

    >>> import fpbma, jax.numpy as jnp, optax
    >>> q = fpbma.DiagGaussian({"a": jnp.zeros(2), "b": jnp.zeros(3)}, {"a": jnp.zeros(2), "b": jnp.zeros(3)})
    >>> tx = fpbma.on_flat_posterior(optax.trace(decay=0.9))
    >>> state = tx.init(q)
    >>> state.trace.mean.shape                                       # momentum on one P-vector
    (5,)
    >>> g = fpbma.DiagGaussian({"a": jnp.ones(2), "b": 2 * jnp.ones(3)}, {"a": jnp.ones(2), "b": jnp.ones(3)})
    >>> updates, state = tx.update(g, state, q)
    >>> [float(x) for x in updates.mean["b"]]                        # split back into the leaves
    [2.0, 2.0, 2.0]
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        _, flat_params = post._flatten(params)
        return inner.init(flat_params)

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        if params is None:
            layout, flat_updates = post._flatten(updates)
            flat_params = None
        else:
            post._validate_like(params, updates, "updates")
            layout, flat_params, flat_updates = post._flatten(params, updates)
        if layout is not None:
            if grad_fn is not None:
                tree_grad_fn = grad_fn
                grad_fn = lambda flat_q: post._flatten(tree_grad_fn(post._unflatten(layout, flat_q)))[1]
            if extra_args.get("noise") is not None:
                extra_args["noise"] = _flat_noise(layout, extra_args["noise"])
        if grad_fn is not None:
            extra_args["grad_fn"] = grad_fn
        new_updates, state = inner.update(flat_updates, state, flat_params, **extra_args)
        return post._unflatten(layout, new_updates), state

    _FLAT_INITS.add(init_fn)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_FLAT_INITS: "weakref.WeakSet" = weakref.WeakSet()


def takes_flat_posterior(tx) -> bool:
    """Whether ``tx`` is an :func:`on_flat_posterior` transform, so that a train step may pass it the
    posterior flat (its state is the same either way)."""
    return getattr(tx, "init", None) in _FLAT_INITS


def flat_step_layout(q, tx) -> Optional[post.FlatLayout]:
    """The layout on which a train step of ``tx`` holds posterior ``q`` flat, or None (the tree).

    Flat when q can be held flat (:func:`fpbma.posterior.flat_layout`) and ``tx`` takes flat posteriors
    (:func:`takes_flat_posterior`: ``fpbma`` and ``vi`` do); any other transform sees the tree, since it
    may treat leaves one by one (per-leaf clipping, masks)."""
    return post.flat_layout(q) if takes_flat_posterior(tx) else None


def _mean_only_mask(q):
    """True on the ``mean`` field of a posterior, False elsewhere (weight decay acts on means only)."""
    return type(q)(*[jax.tree.map(lambda _: name == "mean", field) for name, field in zip(q._fields, q)])


def fpbma(
    learning_rate: ScalarOrSchedule,
    rho: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    natural_gradient: bool = False,
    damping: float = 1e-3,
    nesterov: bool = False,
    batch_axis_name: Optional[str] = None,
    covariance_lr_scale: float = 1.0,
    radius: str = "exact_kl",
    radius_steps: int = 4,
    perturbation: str = "fisher",
    blocks: str = "all",
) -> optax.GradientTransformationExtraArgs:
    """The FP-BMA optimizer for a posterior's parameters θ.

    One ``update`` computes

        Δ* = τ F_θ⁻¹ g,  KL(q_{θ+Δ*} ‖ q_θ) = ρ²/2,  g = ∇_θ L(θ)   (passed in as ``grads``)
        g̃  = ∇_θ L(θ + Δ*)                       (``grad_fn``, same noise ε as g)
        g̃  ← F_θ⁻¹ g̃                             (if ``natural_gradient``)
        g̃  ← g̃ + wd · μ                           (weight decay on the means only)
        m  ← momentum · m + g̃;   update = −η m   (−c·η m on log σ and D, c = covariance_lr_scale)

    and skips the step (zero update, unchanged state, ``num_skipped`` + 1) if either gradient is
    non-finite. ρ = 0 gives plain (natural-gradient) VI, as :func:`vi` does with one gradient pass.

    ``perturbation="released"`` replaces Δ* by the released code's ε = :func:`released_perturbation`
    (the score ∇_θ log q_θ(w) at the step's sample w, normalised per block to norm ρ; the loss gradient
    is not used, ``radius``, ``radius_steps`` and ``damping`` do not enter it); ``update`` then needs
    ``noise=`` (the step's reparameterisation noise) as well as ``grad_fn``. For comparison only.

    Args:
      learning_rate: η, a float or an optax schedule.
      rho: KL-ball radius ρ = √(2γ) ≥ 0.
      momentum: heavy-ball momentum in [0, 1); 0 disables it.
      weight_decay: L2 coefficient added to the mean gradients (coupled, as in SGD), ≥ 0.
      natural_gradient: precondition the outer update by F_θ⁻¹ (natural-gradient VI).
      damping: λ ≥ 0 added to the covariance-block Fisher in both F⁻¹ products.
      nesterov: Nesterov momentum.
      batch_axis_name: pmap axis name; gradients are averaged over it.
      covariance_lr_scale: c > 0, the covariance parameters' (log σ, D) learning rate relative to the
        means'. The reparameterisation gradient of D is g εᵀ: its noise grows with the sampled weights'
        spread, so a rate that suits the means can make D random-walk upward (the transfer experiments
        use c = 0.1); 1 is plain FP-BMA.
      radius: how far along F⁻¹g the perturbation goes: ``"exact_kl"`` (default) solves for the step
        whose true KL is ρ²/2; ``"second_order"`` is the paper's τ = ρ/√(gᵀF⁻¹g), which can leave the
        ball by orders of magnitude when deviation columns are zero or tiny (see :func:`fisher_perturbation`).
      radius_steps: KL evaluations of the exact-radius search.
      perturbation: ``"fisher"`` (default, Δ* above) or ``"released"`` (the released code's normalised
        score, see :func:`released_perturbation`).
      blocks: ``"all"`` (default, the paper's ball over every parameter of q) or ``"mean"`` (the ball over
        the means only: Δ* = ρ Σg_μ/√(g_μᵀΣg_μ), see :func:`fisher_perturbation`); Fisher perturbation only.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes ``grad_fn`` (and ``noise`` with
      ``perturbation="released"``).

    >>> import fpbma, jax, jax.numpy as jnp, optax
    >>> loss = lambda w: 0.5 * jnp.sum((w["w"] - 1.0) ** 2)             # ℓ(w) = ½‖w − 1‖²
    >>> q = fpbma.DiagGaussian.from_point({"w": jnp.zeros(2)}, std=0.1)
    >>> tx = fpbma.fpbma(0.1, rho=0.05, momentum=0.0)
    >>> state = tx.init(q)
    >>> for key in jax.random.split(jax.random.PRNGKey(0), 50):
    ...     noise = fpbma.sample_noise(q, key)                          # one ε for both passes
    ...     grad_fn = jax.grad(lambda t: fpbma.negative_elbo(t, noise, loss))
    ...     updates, state = tx.update(grad_fn(q), state, q, grad_fn=grad_fn)
    ...     q = optax.apply_updates(q, updates)
    >>> int(state.num_skipped), [round(float(m), 1) for m in q.mean["w"]]   # the means reach the minimum
    (0, [1.0, 1.0])

    References:
      Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664.
    """
    _check_number(rho, "rho", low=0.0)
    _check_perturbation(perturbation)
    _check_blocks(blocks)
    if perturbation == "released" and blocks != "all":
        raise ValueError(f"blocks={blocks!r} applies to the Fisher perturbation; the released one normalises "
                         "every block itself: use blocks='all' with perturbation='released'.")
    outer = _outer_update(learning_rate, momentum, weight_decay, natural_gradient, damping, nesterov,
                          covariance_lr_scale)
    if perturbation == "released":
        perturb = perturb_along_score(rho, batch_axis_name)
    else:
        perturb = perturb_in_kl_ball(rho, damping, batch_axis_name, radius, radius_steps, blocks)
    return on_flat_posterior(skip_non_finite(optax.chain(perturb, *outer)))


def vi(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    natural_gradient: bool = False,
    damping: float = 1e-3,
    nesterov: bool = False,
    batch_axis_name: Optional[str] = None,
    covariance_lr_scale: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """Plain VI on a posterior's parameters θ: :func:`fpbma`'s update with no perturbation (ρ = 0).

        g  = ∇_θ L(θ)                 (passed in as ``grads``; one gradient pass per step)
        g  ← F_θ⁻¹ g                  (if ``natural_gradient``)
        g  ← g + wd · μ               (weight decay on the means only)
        m  ← momentum · m + g;   update = −η m   (−c·η m on log σ and D)

    The ablation that isolates FP-BMA's perturbation: same posterior, loss and update, and the same
    parameters after every step as ``fpbma(..., rho=0)`` (which evaluates the gradient at θ twice).
    Skips non-finite steps like :func:`fpbma`. Arguments are :func:`fpbma`'s.

    >>> import fpbma, jax, jax.numpy as jnp, optax
    >>> q = fpbma.DiagGaussian({"w": jnp.ones(2)}, {"w": jnp.zeros(2)})
    >>> tx = fpbma.vi(0.1, momentum=0.0)
    >>> g = jax.tree.map(jnp.ones_like, q)
    >>> updates, _ = tx.update(g, tx.init(q), q)
    >>> [round(float(x), 6) for x in optax.apply_updates(q, updates).mean["w"]]
    [0.9, 0.9]

    References:
      Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664 (VI is
      the ρ = 0 ablation of FP-BMA).
    """
    outer = _outer_update(learning_rate, momentum, weight_decay, natural_gradient, damping, nesterov,
                          covariance_lr_scale)
    if batch_axis_name is not None:
        outer.insert(0, _pmean(batch_axis_name))
    return on_flat_posterior(skip_non_finite(optax.chain(*outer)))


def _pmean(axis_name: str) -> optax.GradientTransformation:
    """Averages the incoming gradient over a pmap axis."""
    return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                        lambda u, state, params=None: (jax.lax.pmean(u, axis_name=axis_name), state))


def _outer_update(learning_rate, momentum, weight_decay, natural_gradient, damping, nesterov,
                  covariance_lr_scale) -> list:
    """The parts after the perturbation: F⁻¹ (optional), weight decay on means, momentum, −η (c·η on log σ, D).

    Shared by :func:`fpbma` and :func:`vi`, so the two updates stay one update."""
    _check_number(learning_rate, "learning_rate", low=0.0, low_open=True)
    _check_number(momentum, "momentum", low=0.0, high=1.0, high_open=True)
    _check_number(weight_decay, "weight_decay", low=0.0)
    _check_number(damping, "damping", low=0.0)
    _check_number(covariance_lr_scale, "covariance_lr_scale", low=0.0, low_open=True)
    parts = []
    if natural_gradient:
        parts.append(scale_by_inverse_fisher(damping))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=_mean_only_mask))
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if covariance_lr_scale != 1.0:
        parts.append(_scale_covariance(covariance_lr_scale))
    return parts


def _scale_covariance(factor: float) -> optax.GradientTransformation:
    """Multiplies the non-mean fields (log σ, D) of posterior-shaped updates by ``factor``."""

    def update_fn(updates, state, params=None):
        del params
        fields = [f if name == "mean" else jax.tree.map(lambda u: factor * u, f)
                  for name, f in zip(updates._fields, updates)]
        return type(updates)(*fields), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def negative_elbo(q, noise, loss_fn: Callable[[PyTree], jax.Array], prior=None,
                  num_data: Optional[int] = None, kl_weight: float = 1.0) -> jax.Array:
    """Per-example negative ELBO  L(θ) = E_q[ℓ(w)] + β KL(q ‖ p) / N  by reparameterisation.

    Args:
      q: the posterior.
      noise: one noise sample (``fpbma.sample_noise``), or several stacked on a leading axis
        (``jax.vmap(sample_noise, (None, 0))(q, keys)``) to average ℓ over them.
      loss_fn: ``w -> ℓ(w)``, the mean mini-batch loss at weights w.
      prior: p, same family as q, or None for no KL term.
      num_data: N, the training-set size (required with a prior).
      kl_weight: β.
    """
    chex.assert_trees_all_equal_structs(q.mean, noise.diag if isinstance(noise, post.LowRankNoise) else noise)
    first = jax.tree_util.tree_leaves(q.mean)[0]
    noise_first = jax.tree_util.tree_leaves(noise)[0]
    if jnp.ndim(noise_first) == jnp.ndim(first) + 1:
        expected = jnp.mean(jax.vmap(lambda e: loss_fn(post.sample_from_noise(q, e)))(noise))
    else:
        expected = loss_fn(post.sample_from_noise(q, noise))
    if prior is None:
        return expected
    if num_data is None or num_data <= 0:
        raise ValueError(f"num_data={num_data}: pass the training-set size N (> 0) with a prior.")
    return expected + kl_weight * post.kl_divergence(q, prior) / num_data
