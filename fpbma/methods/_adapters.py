"""The few ways a method turns a :class:`fpbma.types.Problem` into a :class:`fpbma.types.Trainer`.

* :func:`variational` — q_θ trained on the per-example negative ELBO
  L(θ) = E_{q_θ}[ℓ(w)] + β KL(q_θ ‖ p)/N by reparameterisation (w = sample_from_noise(q_θ, ε), one ε per
  step shared by every gradient of the step), the optimizer called with ``grad_fn`` (FP-BMA, MOPED);
* :func:`point` — w trained on ℓ, the optimizer called with ``grads`` = ∇ℓ(w) and ``grad_fn`` = ∇ℓ
  (SGD, SAM, FSAM, bSAM; with a ``finalize`` reading the optimizer state: SWAG, F-SWAG);
* :func:`langevin` — w moved by a Langevin transform on U(w) = N ℓ(w) − log p(w), samples collected at
  the end of every cycle into a fixed buffer held in the state (cSGLD, E-MCMC);
* :func:`post_hoc` — any trainer whose ``finalize`` fits a posterior afterwards (last-layer Laplace).

Every step skips non-finite results: when the new weights hold a NaN or ±inf (a non-finite gradient),
the step keeps the previous weights, optimizer state and samples and only counts the step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from fpbma import posterior as post
from fpbma.baselines._sgld import is_cycle_end
from fpbma.types import Problem, SampleSet, Trainer, TrainState

__all__ = ["trainer", "variational", "on_initial_posterior", "point", "langevin", "post_hoc", "zero_kl"]


def zero_kl(q) -> jax.Array:
    """KL of a problem without a prior: 0."""
    del q
    return jnp.zeros([], jnp.float32)


def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def trainer(init_params, tx: optax.GradientTransformation, update: Callable, finalize: Callable,
            buffer=(), model_state=None) -> Trainer:
    """A :class:`Trainer` from ``update(state, batch, key) -> (params, opt_state, samples, num_collected)``
    (``model_state`` not None: ``update`` returns a fifth entry, the new model state)."""

    def init():
        return TrainState.create(init_params, tx, model_state, buffer)

    def step(state, batch, key):
        new = tuple(update(state, batch, key))
        if len(new) == 4:
            new = new + (state.model_state,)
        # One conditional rather than a select per leaf (which ties every output to both branches).
        new = jax.lax.cond(_all_finite(new[0]), lambda: new,
                           lambda: (state.params, state.opt_state, state.samples, state.num_collected,
                                    state.model_state))
        return TrainState(state.step + 1, *new)

    return Trainer(init, step, finalize)


def _without_model_state(name: str, problem: Problem) -> None:
    if problem.model_state is not None:
        raise ValueError(f"method {name!r} does not carry model state (problem.model_state is set); train "
                         "BatchNorm-in-train-mode models with a point estimate (sgd, sam, swag, ...) or fix the "
                         "statistics in the loss.")


def variational(problem: Problem, q0, kl_fn: Callable, tx: optax.GradientTransformation,
                kl_weight: float) -> Trainer:
    """q trained on E_q[ℓ(w)] + β KL(q ‖ p)/N; ``finalize`` returns q.

    ``tx.update(∇L(q), state, q, grad_fn=∇L, noise=ε)``: transforms that perturb along the sample
    (FP-BMA's released perturbation) read ``noise``; the others ignore it. The step key splits into the
    reparameterisation noise ε and the key of ℓ (the same in every gradient
    of the step, so sharpness-aware passes differ only by their perturbation).
    """
    _without_model_state("variational", problem)
    n = int(problem.num_data)
    tx = optax.with_extra_args_support(tx)

    def update(state, batch, key):
        k_noise, k_loss = jax.random.split(key)
        q = state.params
        noise = post.sample_noise(q, k_noise)

        def loss(q_):
            expected = problem.loss(post.sample_from_noise(q_, noise), batch, k_loss)
            return expected + kl_weight * kl_fn(q_) / n

        grad_fn = jax.grad(loss)
        updates, opt_state = tx.update(grad_fn(q), state.opt_state, q, grad_fn=grad_fn, noise=noise)
        return optax.apply_updates(q, updates), opt_state, state.samples, state.num_collected

    return trainer(q0, tx, update, lambda s: s.params)


def on_initial_posterior(name: str, problem: Problem, tx: optax.GradientTransformation, kl_weight: float) -> Trainer:
    """:func:`variational` from the problem's own initial posterior and KL term (FP-BMA and its ablations)."""
    if problem.init_posterior is None:
        raise ValueError(f"method {name!r} trains a posterior: the problem needs init_posterior (a LowRankGaussian).")
    return variational(problem, problem.init_posterior, problem.kl or zero_kl, tx, kl_weight)


def point(problem: Problem, tx: optax.GradientTransformation, finalize: Callable) -> Trainer:
    """w from ``problem.init_params`` trained on ℓ; ``update(∇ℓ(w), state, w, grad_fn=∇ℓ)``.

    Transforms that evaluate gradients themselves (SAM, bSAM) call ``grad_fn``; the others ignore it.
    With ``problem.model_state`` the loss also returns the new model state; the state keeps the one of the
    clean pass (a perturbed pass's side effects are discarded).
    """
    tx = optax.with_extra_args_support(tx)

    if problem.model_state is None:
        def update(state, batch, key):
            grad_fn = jax.grad(lambda w_: problem.loss(w_, batch, key))
            updates, opt_state = tx.update(grad_fn(state.params), state.opt_state, state.params, grad_fn=grad_fn)
            return optax.apply_updates(state.params, updates), opt_state, state.samples, state.num_collected
    else:
        def update(state, batch, key):
            stateful = jax.grad(lambda w_: problem.loss(w_, batch, key, state.model_state), has_aux=True)
            grads, model_state = stateful(state.params)
            grad_fn = lambda w_: stateful(w_)[0]  # noqa: E731
            updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
            return (optax.apply_updates(state.params, updates), opt_state, state.samples, state.num_collected,
                    model_state)

    return trainer(problem.init_params, tx, update, finalize, model_state=problem.model_state)


def langevin(name: str, problem: Problem, tx: optax.GradientTransformation, *, num_steps: int, n_cycle: int,
             collect: Callable[[object, object], Sequence], per_cycle: int = 1) -> Trainer:
    """Langevin dynamics on U(w) = N ℓ(w) − log p(w); ``collect(params, opt_state)`` at every cycle end.

    ``tx`` gets ∇U (the *summed* potential); the buffer holds ``n_cycle · per_cycle`` samples and
    ``finalize`` returns the collected ones as a :class:`fpbma.types.SampleSet`.
    """
    _without_model_state(name, problem)
    n = int(problem.num_data)
    size = n_cycle * per_cycle
    buffer = jax.tree.map(lambda x: jnp.zeros((size,) + jnp.shape(x), jnp.float32), problem.init_params)

    def update(state, batch, key):
        def potential(w_):
            u = n * problem.loss(w_, batch, key)
            return u if problem.log_prior is None else u - problem.log_prior(w_)

        updates, opt_state = tx.update(jax.grad(potential)(state.params), state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        done = is_cycle_end(state.step + 1, num_steps, n_cycle)
        samples, num = state.samples, state.num_collected
        for w in collect(params, opt_state):
            row = jnp.minimum(num, size - 1)
            samples = jax.tree.map(lambda b, x: jnp.where(done, b.at[row].set(x), b), samples, w)
            num = num + done.astype(jnp.int32)
        return params, opt_state, samples, num

    def finalize(s):
        m = int(s.num_collected)
        if m < 1:
            raise ValueError(f"{name} collected no samples in {int(s.step)} steps; run all {num_steps} steps.")
        return SampleSet(jax.tree.map(lambda b: b[:m], s.samples))

    return trainer(problem.init_params, tx, update, finalize, buffer)


def post_hoc(base: Trainer, fit: Callable) -> Trainer:
    """``base`` with ``finalize(state) = fit(state)`` (a posterior fitted at the trained weights)."""
    return Trainer(base.init, base.step, fit)
