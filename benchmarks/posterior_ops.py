"""Where a full-network LowRankGaussian (K = 5) FP-BMA step spends its time beyond the two passes.

Times each posterior operation that a full K=5 FP-BMA step runs, jitted, on the parameter tree of a
real network, and prints it next to one elementwise pass over θ (read μ, log σ, D and write them back:
7P floats for K = 5). Those operations are O(P·K) and memory-bound, so their cost in "passes over θ"
is what decides whether a step can stay near 2× SGD: on a CPU whose SGD step does little compute per
weight (ResNet-18 at 32 px, batch 32) they cannot, on an accelerator they can.

    PYTHONPATH=. python -m benchmarks.posterior_ops --model resnet18_small
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

import fpbma
import fpbma.models as M
from fpbma import posterior as post
from benchmarks.transfer_step_cost import low_rank_prior


def median_seconds(fn, *args, repeats=5):
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18_small")
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    key = jax.random.PRNGKey(0)
    _, variables = M.create(args.model, 10, key=key, image_size=32)
    params = variables["params"]
    q = low_rank_prior(params, key, rank=args.rank)
    p = low_rank_prior(params, jax.random.PRNGKey(1), rank=args.rank)
    noise = post.sample_noise(q, key)
    g_w = jax.tree.map(jnp.ones_like, params)
    v = jax.tree.map(jnp.ones_like, q)
    tx = fpbma.fpbma(0.01, rho=0.05)
    opt_state = tx.init(q)
    num = post.num_parameters(params)
    print(f"{args.model}: P = {num:,} weights, K = {args.rank}; jax {jax.__version__}, {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; median of {args.repeats}")
    ops = [
        ("one elementwise pass over θ (reference)", lambda q: jax.tree.map(lambda x: x * 1.0001, q), (q,)),
        ("sample_noise", post.sample_noise, (q, key)),
        ("sample_from_noise", post.sample_from_noise, (q, noise)),
        ("VJP of sample_from_noise", lambda q, n, g: jax.vjp(lambda t: post.sample_from_noise(t, n), q)[1](g),
         (q, noise, g_w)),
        ("kl_divergence(q, p)", post.kl_divergence, (q, p)),
        ("grad of kl_divergence", jax.grad(post.kl_divergence), (q, p)),
        ("fisher_diagonal", lambda q: post.fisher_diagonal(q, 1e-3), (q,)),
        ("inverse_fisher_vp", lambda q, v: post.inverse_fisher_vp(q, v, 1e-3), (q, v)),
        ("fpbma update (grad_fn returns v)", lambda q, v, s: tx.update(v, s, q, grad_fn=lambda t: v), (q, v, opt_state)),
    ]
    print("| operation | ms | passes over θ |")
    print("|---|---|---|")
    ref = None
    for name, fn, fn_args in ops:
        t = median_seconds(fn, *fn_args, repeats=args.repeats)
        ref = ref or t
        print(f"| {name} | {1e3 * t:.1f} | {t / ref:.1f} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
