"""Step cost of FP-BMA and SAM relative to SGD for ResNets at 32 px, in the paper's two settings.

* ``nl_ll`` transfer (the scheme of :mod:`fpbma.transfer`): θ is a LowRankGaussian over the normalisation layers and the head;
  every other weight is frozen and *sampled from the LowRank (K=5) prior* at every forward pass.
  SGD and SAM train the same subset as a point estimate with the frozen weights at the prior mean.
* ``full K=5``: θ is a LowRankGaussian (K = 5) over every weight; SGD and SAM train every weight.

FP-BMA's floor is two forward+backward passes, 2.0× SGD; the goals are ≤ 2.1× (nl_ll) and ≤ 2.3×
(full K=5). ``FP-BMA`` is the default transform (the perturbation on the exact KL ball); the row
``fpbma_second_order`` is the paper's second-order radius, so the cost of the exact ball is their ratio.
Every step is the library's jitted, donated step (:func:`fpbma.parallel.make_train_step`
under :func:`fpbma.parallel.make_data_parallel_step`); methods are timed round-robin (one step of each
in turn) so load from other processes hits all of them alike, and the median is reported.

    PYTHONPATH=. python -m benchmarks.transfer_step_cost                   # both models, 20 steps
    PYTHONPATH=. python -m benchmarks.transfer_step_cost --models resnet20 --steps 30 --batch 64
    PYTHONPATH=. python -m benchmarks.transfer_step_cost --models resnet18_small --settings full --skip sam
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import fpbma
import fpbma.baselines as B
import fpbma.models as M
from fpbma import parallel
from fpbma.models import partition


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def low_rank_prior(params, key, rank=5, std=1e-2):
    """A SWAG-like LowRankGaussian around ``params`` (random deviation columns of scale ``std``)."""
    q = fpbma.LowRankGaussian.from_point(params, std, rank=rank)
    leaves, treedef = jax.tree_util.tree_flatten(q.cov_factor)
    keys = jax.random.split(key, len(leaves))
    cov = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return q._replace(cov_factor=jax.tree_util.tree_unflatten(treedef, cov))


def split_posterior(q, scheme):
    """(q restricted to the ``scheme`` subset, q restricted to the rest): exact Gaussian marginals."""
    parts = [partition.split(field, scheme) for field in q]
    return type(q)(*[p[0] for p in parts]), type(q)(*[p[1] for p in parts])


def make_setups(model, variables, key, setting, compute_dtype=None, profile=False):
    """{method: (step_fn, initial TrainState)} for one model and setting ("nl_ll" or "full").

    With ``profile`` (nl_ll only) four more rows split FP-BMA's cost: ``fpbma_fixed`` (frozen weights
    at the prior mean: no sampling of the ~P frozen weights), ``vi`` (one pass with sampling and KL:
    everything but the perturbed pass), ``fpbma_rbg`` (the same FP-BMA step fed an ``rbg`` PRNG key,
    a cheaper bit generator than threefry for the per-step noise) and ``sgd_sampled`` (SGD with the
    frozen weights drawn from the prior at every step, as ``experiments.transfer`` trains every method).
    """
    params, stats = variables["params"], variables["batch_stats"]
    prior = low_rank_prior(params, key)

    def apply(p, model_state, x, y):
        logits, upd = model.apply({"params": p, "batch_stats": model_state["batch_stats"]}, x, train=True,
                                  mutable=["batch_stats"])
        return cross_entropy(logits, y), {**model_state, **upd}

    sgd = B.sgd(0.01, momentum=0.9)
    sam = B.sam(0.01, rho=0.05)
    fp = fpbma.fpbma(0.01, rho=0.05)
    # The paper's second-order radius, timed beside the default exact-KL radius: what the exact ball costs.
    fp_second = fpbma.fpbma(0.01, rho=0.05, radius="second_order")
    kw = dict(compute_dtype=compute_dtype)
    setups = {}
    if setting == "nl_ll":
        prior_sub, prior_rest = split_posterior(prior, "nl_ll")
        rest_mean = prior_rest.mean

        def point_loss(w, ms, batch, key):
            return apply(partition.merge(w, ms["frozen"]), ms, batch["image"], batch["label"])

        def bayes_loss(w, ms, batch, key):
            # The frozen weights are drawn from the prior's marginal at every pass (same key in both passes).
            frozen = fpbma.sample(ms["prior_rest"], key)
            frozen = jax.tree.map(lambda a: a.astype(compute_dtype) if compute_dtype else a, frozen)
            return apply(partition.merge(w, frozen), ms, batch["image"], batch["label"])

        point_state = {"batch_stats": stats, "frozen": rest_mean}
        for name, tx in (("sgd", sgd), ("sam", sam)):
            setups[name] = (parallel.make_train_step(point_loss, tx, **kw),
                            parallel.TrainState.create(prior_sub.mean, tx, point_state))
        bayes_state = {"batch_stats": stats, "prior_rest": prior_rest}
        setups["fpbma"] = (parallel.make_train_step(bayes_loss, fp, prior=prior_sub, num_data=50_000, **kw),
                           parallel.TrainState.create(prior_sub, fp, bayes_state))
        setups["fpbma_second_order"] = (
            parallel.make_train_step(bayes_loss, fp_second, prior=prior_sub, num_data=50_000, **kw),
            parallel.TrainState.create(prior_sub, fp_second, bayes_state))
        if profile:
            setups["fpbma_fixed"] = (parallel.make_train_step(point_loss, fp, prior=prior_sub, num_data=50_000, **kw),
                                     parallel.TrainState.create(prior_sub, fp, point_state))
            setups["vi"] = (parallel.make_train_step(bayes_loss, sgd, prior=prior_sub, num_data=50_000, **kw),
                            parallel.TrainState.create(prior_sub, sgd, bayes_state))
            # SGD as the transfer experiments run it: the frozen weights drawn from the prior every step too.
            setups["sgd_sampled"] = (parallel.make_train_step(bayes_loss, sgd, **kw),
                                     parallel.TrainState.create(prior_sub.mean, sgd, bayes_state))
            # A distinct function object: jax.jit caches per function, and the rbg key is another input type.
            fp_step, fp_state = setups["fpbma"]
            setups["fpbma_rbg"] = (lambda state, batch, key: fp_step(state, batch, key), fp_state)
    else:
        def loss(w, ms, batch, key):
            return apply(w, ms, batch["image"], batch["label"])

        for name, tx in (("sgd", sgd), ("sam", sam)):
            setups[name] = (parallel.make_train_step(loss, tx, **kw),
                            parallel.TrainState.create(params, tx, {"batch_stats": stats}))
        setups["fpbma"] = (parallel.make_train_step(loss, fp, prior=prior, num_data=50_000, **kw),
                           parallel.TrainState.create(prior, fp, {"batch_stats": stats}))
        setups["fpbma_second_order"] = (parallel.make_train_step(loss, fp_second, prior=prior, num_data=50_000, **kw),
                                        parallel.TrainState.create(prior, fp_second, {"batch_stats": stats}))
    return setups


def _key(name, i):
    return jax.random.key(i, impl="rbg") if name.endswith("_rbg") else jax.random.PRNGKey(i)


def time_round_robin(setups, batch, steps, warmup=2, mesh=None):
    """Median seconds per step of each method, timing one step of each in turn."""
    mesh = mesh or parallel.data_mesh(jax.devices()[:1])
    batch = parallel.shard_batch(batch, mesh)
    runners, compile_s = {}, {}
    for name, (step_fn, state) in setups.items():
        step = parallel.make_data_parallel_step(step_fn, mesh)
        state = parallel.replicate(state, mesh)
        t0 = time.perf_counter()
        state, _ = step(state, batch, _key(name, 0))
        jax.block_until_ready(state)
        compile_s[name] = time.perf_counter() - t0
        for i in range(warmup):
            state, _ = step(state, batch, _key(name, i))
        jax.block_until_ready(state)
        runners[name] = [step, state]
    times = {name: [] for name in setups}
    for i in range(steps):
        for name, runner in runners.items():
            step, state = runner
            t0 = time.perf_counter()
            state, metrics = step(state, batch, _key(name, i))
            jax.block_until_ready((state, metrics))
            times[name].append(time.perf_counter() - t0)
            runner[1] = state
    for name, (step, _) in runners.items():
        assert step.num_compilations() == 1, f"{name} recompiled"
    return {name: statistics.median(t) for name, t in times.items()}, compile_s


GOALS = {"nl_ll": 2.1, "full": 2.3}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet18_small"])
    parser.add_argument("--settings", nargs="+", default=["nl_ll", "full"], choices=["nl_ll", "full"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method (median)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bf16", action="store_true", help="compute_dtype=bfloat16 (θ stays float32)")
    parser.add_argument("--profile", action="store_true", help="nl_ll: extra rows splitting FP-BMA's cost")
    parser.add_argument("--skip", nargs="*", default=[], choices=["sam", "fpbma_second_order"],
                        help="rows not to build (each compiled step holds its buffers: ResNet-18 full K=5 with "
                             "every row needs ~16 GiB)")
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1")
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start; batch {args.batch}, 32 px, median of {args.steps} "
          f"steps timed round-robin{', bf16 compute' if args.bf16 else ''}")
    print("| model | setting | trainable P | SGD ms | SAM ms | FP-BMA ms | SAM/SGD | FP-BMA/SGD | goal | met |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    key = jax.random.PRNGKey(0)
    for name in args.models:
        model, variables = M.create(name, 10, key=key, image_size=32)
        batch = {"image": jax.random.normal(key, (args.batch, 32, 32, 3)),
                 "label": jnp.arange(args.batch) % 10}
        for setting in args.settings:
            setups = make_setups(model, variables, key, setting, jnp.bfloat16 if args.bf16 else None,
                                 profile=args.profile and setting == "nl_ll")
            for skipped in args.skip:
                setups.pop(skipped)
            trainable = partition.count(setups["sgd"][1].params)
            t, compile_s = time_round_robin(setups, batch, args.steps)
            ratio = t["fpbma"] / t["sgd"]
            print(f"| {name} | {setting}{' K=5' if setting == 'full' else ''} | {trainable:,} | "
                  f"{1e3 * t['sgd']:.1f} | {1e3 * t.get('sam', float('nan')):.1f} | {1e3 * t['fpbma']:.1f} | "
                  f"{t.get('sam', float('nan')) / t['sgd']:.2f} | {ratio:.2f} | ≤ {GOALS[setting]} | "
                  f"{'yes' if ratio <= GOALS[setting] else 'no'} |", flush=True)
            print("  training images/s: " + ", ".join(f"{k} {args.batch / v:.1f}" for k, v in t.items()), flush=True)
            print("  first call (compile + one step), s: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()), flush=True)
            extra = {k: v / t["sgd"] for k, v in t.items() if k not in ("sgd", "sam", "fpbma")}
            if extra:
                print("  profile, ratio to SGD: " + ", ".join(f"{k} {v:.2f}" for k, v in extra.items()), flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process max RSS {rss:.0f} MiB; load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
