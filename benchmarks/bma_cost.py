"""Cost of 30-sample BMA relative to 30 plain forward passes, BMA images/s, and its peak memory.

    ratio = time(fpbma.bma.predict, S = 30) / time(30 jitted forward passes over the same data)

The two are timed back to back in each repeat (median of the per-repeat ratios), so load from other
processes on a shared machine hits numerator and denominator alike.

The goal is ≤ 1.1: sampling on device and the running log-sum-exp accumulator should add little to
the S forward passes. Peak memory is XLA's compiled ``memory_analysis`` of the BMA program (temporary
buffers; it should not grow with S at a fixed chunk size) and the process's max RSS.

    PYTHONPATH=. python -m benchmarks.bma_cost                    # resnet20, 256 images, 30 samples
    PYTHONPATH=. python -m benchmarks.bma_cost --model resnet18_small --num 128 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import time

import jax
from jax.tree_util import Partial

import fpbma
import fpbma.models as M
from fpbma import bma


def _apply(model, stats, w, x):
    return model.apply({"params": w, "batch_stats": stats}, x, train=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--num", type=int, default=256, help="test images")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=5, help="timed BMA calls (median)")
    args = parser.parse_args()
    key = jax.random.PRNGKey(0)
    model, variables = M.create(args.model, 10, key=key, image_size=32)
    q = fpbma.DiagGaussian.from_point(variables["params"], 1e-2)
    x = jax.random.normal(key, (args.num, 32, 32, 3))
    # The module is static (in the function), the statistics are traced leaves.
    apply_fn = Partial(functools.partial(_apply, model), variables["batch_stats"])
    sample_weights = Partial(fpbma.sample, q)

    forward = jax.jit(lambda w, x: apply_fn(w, x))
    w0 = fpbma.sample(q, key)
    jax.block_until_ready(forward(w0, x))
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; {args.model}, {args.num} images 32 px, DiagGaussian over "
          f"{fpbma.num_parameters(variables['params']):,} weights; medians of {args.repeats} interleaved repeats")
    print("| S | chunk | S forwards s | BMA s | BMA / (S × forward) | forward images/s | BMA images/s | "
          "XLA temp MiB | XLA args+out MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in sorted({10, args.samples}):
        for chunk in args.chunks:
            run = lambda: bma.predict(apply_fn, sample_weights, x, key=key, num_samples=s, chunk_size=chunk)
            jax.block_until_ready(run())  # compile
            fwd_times, bma_times = [], []
            for _ in range(args.repeats):
                # Denominator and numerator back to back, so load from other processes hits both alike.
                t0 = time.perf_counter()
                for _ in range(s):
                    jax.block_until_ready(forward(w0, x))
                fwd_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                jax.block_until_ready(run())
                bma_times.append(time.perf_counter() - t0)
            ratio = statistics.median([b / f for b, f in zip(bma_times, fwd_times)])
            t_fwd, t = statistics.median(fwd_times), statistics.median(bma_times)
            compiled = bma._sampled_log_predictive.lower(apply_fn, sample_weights, None, key, x, num_samples=s,
                                                         chunk_size=chunk).compile()
            mem = compiled.memory_analysis()
            temp = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**20
            io = (getattr(mem, "argument_size_in_bytes", 0) + getattr(mem, "output_size_in_bytes", 0)) / 2**20
            print(f"| {s} | {chunk} | {t_fwd:.2f} | {t:.2f} | {ratio:.3f} | {s * args.num / t_fwd:.0f} | "
                  f"{s * args.num / t:.0f} (sample·image) = {args.num / t:.1f} BMA predictions/s | {temp:.1f} | "
                  f"{io:.1f} |", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process max RSS: {rss:.0f} MiB; load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
