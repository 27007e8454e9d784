"""Peak memory of the full K = 5 FP-BMA train step beside its goal, 4 × (θ + optimizer state + activations).

One process per measurement (``--method``), so the process's peak resident memory is that step's alone:

* ``fpbma``: the library step (:func:`fpbma.parallel.make_train_step`, default ``fpbma.fpbma``) with θ a
  LowRankGaussian (K = 5) over every weight of the model and the KL to a K = 5 prior;
* ``sgd``: SGD with momentum on every weight of the same model.

It prints the bytes of θ and of the optimizer state, XLA's own accounting of the compiled step
(``compiled.memory_analysis()``: arguments, outputs and the temporary buffers, which hold the
activations), and the process's peak resident set size after ``--steps`` steps. "Activations" in the goal
are the temporary buffers of the SGD step (one forward and backward pass of the model at this batch).

    PYTHONPATH=. python -m benchmarks.step_memory --method sgd
    PYTHONPATH=. python -m benchmarks.step_memory --method fpbma
"""

from __future__ import annotations

import argparse
import resource

import jax
import jax.numpy as jnp

import fpbma
import fpbma.baselines as B
import fpbma.models as M
from benchmarks.transfer_step_cost import cross_entropy, low_rank_prior
from fpbma import parallel

MIB = 2 ** 20


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18_small")
    parser.add_argument("--method", choices=["fpbma", "sgd"], default="fpbma")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    key = jax.random.PRNGKey(0)
    model, variables = M.create(args.model, 10, key=key, image_size=32)
    params, stats = variables["params"], variables["batch_stats"]
    batch = {"image": jax.random.normal(key, (args.batch, 32, 32, 3)), "label": jnp.arange(args.batch) % 10}

    def loss(w, ms, batch, key):
        logits, upd = model.apply({"params": w, "batch_stats": ms["batch_stats"]}, batch["image"], train=True,
                                  mutable=["batch_stats"])
        return cross_entropy(logits, batch["label"]), {**ms, **upd}

    if args.method == "fpbma":
        prior = low_rank_prior(params, key)
        tx = fpbma.fpbma(0.01, rho=0.05)
        state = parallel.TrainState.create(prior, tx, {"batch_stats": stats})
        step = parallel.make_train_step(loss, tx, prior=prior, num_data=50_000)
        del prior
    else:
        tx = B.sgd(0.01, momentum=0.9)
        state = parallel.TrainState.create(params, tx, {"batch_stats": stats})
        step = parallel.make_train_step(loss, tx)
    jitted = jax.jit(step, donate_argnums=0)
    compiled = jitted.lower(state, batch, key).compile()
    mem = compiled.memory_analysis()
    theta, opt = tree_bytes(state.params), tree_bytes(state.opt_state)
    for _ in range(args.steps):
        state, _ = compiled(state, batch, key)
    jax.block_until_ready(state)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{args.model} {args.method} batch {args.batch}: θ {theta / MIB:.0f} MiB, optimizer state {opt / MIB:.0f} MiB; "
          f"XLA arguments {mem.argument_size_in_bytes / MIB:.0f} MiB, outputs {mem.output_size_in_bytes / MIB:.0f} MiB, "
          f"temporaries {mem.temp_size_in_bytes / MIB:.0f} MiB; process peak RSS {rss / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
