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

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from fpbma import posterior as post
from fpbma import transforms
from fpbma.baselines._sgld import is_cycle_end
from fpbma.types import Problem, SampleSet, Trainer, TrainState

__all__ = ["StepUpdate", "trainer", "variational", "on_initial_posterior", "point", "langevin", "post_hoc", "zero_kl"]


def zero_kl(q) -> jax.Array:
    """KL of a problem without a prior: 0."""
    del q
    return jnp.zeros([], jnp.float32)


def _all_finite(tree) -> jax.Array:
    return transforms.all_finite([x for x in jax.tree_util.tree_leaves(tree)
                                  if jnp.issubdtype(jnp.result_type(x), jnp.inexact)])


class StepUpdate(NamedTuple):
    """What a method's update returns: the new trained object, optimizer state and sample buffer, the new
    model state (None: unchanged) and the step's scalar metrics (e.g. ``{"loss": ℓ, "kl": KL}``)."""

    params: Any
    opt_state: Any
    samples: Any
    num_collected: jax.Array
    model_state: Any = None
    metrics: Optional[dict] = None


def trainer(init_params, tx: optax.GradientTransformation, update: Callable, finalize: Callable,
            buffer=(), model_state=None, metrics: Sequence[str] = ("loss",)) -> Trainer:
    """A :class:`Trainer` from ``update(state, batch, key) -> StepUpdate``.

    The state's ``metrics`` hold the last step's values of ``metrics`` (float32 scalars, the ones the
    update reports) and ``num_skipped``, the steps skipped so far for a non-finite result.
    """

    def init():
        zeros = {name: jnp.zeros([], jnp.float32) for name in metrics}
        return TrainState.create(init_params, tx, model_state, buffer)._replace(
            metrics={**zeros, "num_skipped": jnp.zeros([], jnp.int32)})

    def step(state, batch, key):
        new = update(state, batch, key)
        kept = (new.params, new.opt_state, new.samples, new.num_collected,
                state.model_state if new.model_state is None else new.model_state)
        ok = _all_finite(new.params)
        # One conditional rather than a select per leaf (which ties every output to both branches).
        kept = jax.lax.cond(ok, lambda: kept,
                            lambda: (state.params, state.opt_state, state.samples, state.num_collected,
                                     state.model_state))
        reported = {k: jnp.asarray(v, jnp.float32) for k, v in (new.metrics or {}).items()}
        step_metrics = {**state.metrics, **reported,
                        "num_skipped": state.metrics["num_skipped"] + (1 - ok.astype(jnp.int32))}
        return TrainState(state.step + 1, *kept, step_metrics)

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

    # On flat buffers when tx takes them (fpbma.fpbma, fpbma.vi; see fpbma.FlatLayout): the step's
    # posterior algebra, optimizer and update then trace to a size independent of the number of leaves.
    layout = transforms.flat_step_layout(q0, tx)
    as_tree = layout.unflatten if layout else (lambda q_: q_)
    as_weights = layout.leaves if layout else (lambda w: w)

    def update(state, batch, key):
        k_noise, k_loss = jax.random.split(key)
        q = layout.flatten(state.params) if layout else state.params
        noise = post.sample_noise(q, k_noise)

        def loss(q_):
            expected = problem.loss(as_weights(post.sample_from_noise(q_, noise)), batch, k_loss)
            kl = kl_fn(as_tree(q_))
            return expected + kl_weight * kl / n, (expected, kl)

        (_, (expected, kl)), grads = jax.value_and_grad(loss, has_aux=True)(q)
        grad_fn = jax.grad(lambda q_: loss(q_)[0])
        updates, opt_state = tx.update(grads, state.opt_state, q, grad_fn=grad_fn, noise=noise)
        return StepUpdate(as_tree(optax.apply_updates(q, updates)), opt_state, state.samples, state.num_collected,
                          metrics={"loss": expected, "kl": kl})

    return trainer(q0, tx, update, lambda s: s.params, metrics=("loss", "kl"))


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
            loss = lambda w_: problem.loss(w_, batch, key)  # noqa: E731
            value, grads = jax.value_and_grad(loss)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=jax.grad(loss))
            return StepUpdate(optax.apply_updates(state.params, updates), opt_state, state.samples,
                              state.num_collected, metrics={"loss": value})
    else:
        def update(state, batch, key):
            loss = lambda w_: problem.loss(w_, batch, key, state.model_state)  # noqa: E731
            (value, model_state), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
            grad_fn = lambda w_: jax.grad(loss, has_aux=True)(w_)[0]  # noqa: E731
            updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
            return StepUpdate(optax.apply_updates(state.params, updates), opt_state, state.samples,
                              state.num_collected, model_state, {"loss": value})

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
            mean_loss = problem.loss(w_, batch, key)
            u = n * mean_loss
            return (u if problem.log_prior is None else u - problem.log_prior(w_)), mean_loss

        (_, mean_loss), grads = jax.value_and_grad(potential, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        done = is_cycle_end(state.step + 1, num_steps, n_cycle)
        samples, num = state.samples, state.num_collected
        for w in collect(params, opt_state):
            row = jnp.minimum(num, size - 1)
            samples = jax.tree.map(lambda b, x: jnp.where(done, b.at[row].set(x), b), samples, w)
            num = num + done.astype(jnp.int32)
        return StepUpdate(params, opt_state, samples, num, metrics={"loss": mean_loss})

    def finalize(s):
        m = int(s.num_collected)
        if m < 1:
            raise ValueError(f"{name} collected no samples in {int(s.step)} steps; run all {num_steps} steps.")
        return SampleSet(jax.tree.map(lambda b: b[:m], s.samples))

    return trainer(problem.init_params, tx, update, finalize, buffer)


def post_hoc(base: Trainer, fit: Callable) -> Trainer:
    """``base`` with ``finalize(state) = fit(state)`` (a posterior fitted at the trained weights)."""
    return Trainer(base.init, base.step, fit)
