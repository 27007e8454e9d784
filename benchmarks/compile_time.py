"""Compile time of FP-BMA's train step beside SGD's on the same model and trainable subset, in one run.

For each row (model × subset × method) it reports the seconds of ``jax.jit(step).lower(*args).compile()``
(tracing, lowering and XLA compilation of one step), the steady seconds of one step of the compiled
executable (median of ``--steps`` calls after one warm-up), and the FP-BMA / SGD ratio of each.

Subsets:

* ``nl_ll``: θ is a LowRankGaussian (K = 5) over the normalisation layers and the head; the other weights
  are frozen and drawn from a LowRank (K = 5) prior at every pass (the transfer setting). SGD trains the
  same subset as a point estimate with the frozen weights at the prior mean.
* ``full``: θ is a LowRankGaussian (K = 5) over every weight; SGD trains every weight.
* ``transfer``: the trainers the experiments run (:func:`fpbma.transfer.make_trainer` on the nl_ll scheme
  of a K = 5 prior, BatchNorm in eval mode): ``sgd`` against ``fpbma`` with its defaults. Both draw the
  frozen weights from the prior at every pass, as ``experiments.transfer`` trains every method.
* ``own``: the README's own-loop pattern, ``fpbma.fpbma`` + ``fpbma.negative_elbo`` in a hand-written
  step (K = 5 over every weight, KL to a LowRank prior), against a hand-written SGD step.
* ``own_flat``: the same with θ and the prior held flat (:class:`fpbma.FlatLayout`, the README's form
  for deep networks).

``nl_ll`` and ``full`` use the library's step (:func:`fpbma.parallel.make_train_step`). Only ratios
measured in the same run are comparable: on a machine shared with other processes the absolute seconds
are noisy.

    PYTHONPATH=. python -m benchmarks.compile_time                              # resnet20: nl_ll, full, own
    PYTHONPATH=. python -m benchmarks.compile_time --models resnet20 resnet18_small --subsets nl_ll full
    PYTHONPATH=. python -m benchmarks.compile_time --steps 5
    PYTHONPATH=. python -m benchmarks.compile_time --models efficientnet_lite0 --subsets transfer --image-size 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import fpbma
import fpbma.models as M
from benchmarks.transfer_step_cost import cross_entropy, low_rank_prior, make_setups


def own_loop_setups(model, variables, key, batch, flat=False):
    """{method: (step, args)} for the README's own-loop pattern: ``step(q, state, key)``; with ``flat``
    the README's deep-network form (θ and the prior held flat by a :class:`fpbma.FlatLayout`)."""
    params, stats = variables["params"], variables["batch_stats"]
    prior = low_rank_prior(params, key)

    def tree_loss(w):
        logits, _ = model.apply({"params": w, "batch_stats": stats}, batch["image"], train=True,
                                mutable=["batch_stats"])
        return cross_entropy(logits, batch["label"])

    loss = tree_loss
    if flat:
        layout = fpbma.FlatLayout(prior.mean)
        prior = layout.flatten(prior)
        loss = lambda w: tree_loss(layout.leaves(w))  # noqa: E731

    sgd = optax.sgd(0.01, momentum=0.9)

    def sgd_step(p, state, key):
        del key
        updates, state = sgd.update(jax.grad(tree_loss)(p), state, p)
        return optax.apply_updates(p, updates), state

    tx = fpbma.fpbma(0.01, rho=0.05)

    def fpbma_step(q, state, key, p):
        noise = fpbma.sample_noise(q, key)
        grad_fn = jax.grad(lambda t: fpbma.negative_elbo(t, noise, loss, p, num_data=50_000))
        updates, state = tx.update(grad_fn(q), state, q, grad_fn=grad_fn)
        return optax.apply_updates(q, updates), state

    # The prior is an argument of the step, not a constant closed over: XLA would fold arithmetic on
    # constants of the network's size at compile time.
    return {"sgd": (sgd_step, (params, sgd.init(params), key)),
            "fpbma": (fpbma_step, (prior, tx.init(prior), key, prior))}


def transfer_setups(model, variables, key, batch):
    """{method: (step, args)} for the method interface's trainers on the nl_ll transfer scheme."""
    from fpbma import transfer

    params, stats = variables["params"], variables["batch_stats"]
    prior = low_rank_prior({k: v for k, v in params.items() if k != "head"}, key)
    scheme = transfer.make_scheme(prior, params, "nl_ll")

    def apply_fn(p, images):
        return model.apply({"params": p, "batch_stats": stats}, images, train=False)

    out = {}
    for name in ("sgd", "fpbma"):
        trainer = transfer.make_trainer(name, scheme, apply_fn, num_data=50_000, num_steps=100, learning_rate=0.01)
        out[name] = (trainer.step, (trainer.init(), batch, key))
    return out


def library_setups(model, variables, key, batch, subset):
    """{method: (step, args)} for the library step ``step(state, batch, key)`` (SGD and default FP-BMA)."""
    setups = make_setups(model, variables, key, subset)
    return {name: (setups[name][0], (setups[name][1], batch, key)) for name in ("sgd", "fpbma")}


def measure(step, args, steps):
    """(compile seconds, median steady seconds per step) of ``jax.jit(step)`` at ``args``."""
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20"])
    parser.add_argument("--subsets", nargs="+", default=["nl_ll", "full", "own"], choices=["nl_ll", "full", "own", "own_flat", "transfer"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (median)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start; batch {args.batch}, {args.image_size} px, K = 5, "
          f"steady step = median of {args.steps}")
    print("| model | subset | leaves of μ | SGD compile s | FP-BMA compile s | compile ratio | "
          "SGD step s | FP-BMA step s | step ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    key = jax.random.PRNGKey(0)
    for name in args.models:
        size = args.image_size
        model, variables = M.create(name, 10, key=key, image_size=size)
        batch = {"image": jax.random.normal(key, (args.batch, size, size, 3)), "label": jnp.arange(args.batch) % 10}
        for subset in args.subsets:
            if subset in ("own", "own_flat"):
                rows = own_loop_setups(model, variables, key, batch, flat=subset == "own_flat")
            elif subset == "transfer":
                rows = transfer_setups(model, variables, key, batch)
            else:
                rows = library_setups(model, variables, key, batch, subset)
            q = rows["fpbma"][1][0]
            leaves = len(jax.tree_util.tree_leaves(variables["params"] if subset == "own_flat"
                                                   else (q if subset == "own" else q.params).mean))
            res = {method: measure(step, step_args, args.steps) for method, (step, step_args) in rows.items()}
            (cs, ss), (cf, sf) = res["sgd"], res["fpbma"]
            print(f"| {name} | {subset} | {leaves} | {cs:.1f} | {cf:.1f} | {cf / cs:.1f} | "
                  f"{ss:.3f} | {sf:.3f} | {sf / ss:.2f} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
