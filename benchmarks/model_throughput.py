"""Forward and forward+backward throughput (images/s) of the backbones on this machine's CPU.

Forward: ``model.apply(variables, x, train=False)``. Forward+backward: the gradient of the mean
softmax cross-entropy w.r.t. all parameters in train mode (batch statistics, running statistics
returned), i.e. one SGD step's worth of work without the optimizer. Both jit-compiled; compile
time is excluded and reported separately.

    PYTHONPATH=. python benchmarks/model_throughput.py            # full table
    PYTHONPATH=. python benchmarks/model_throughput.py --quick    # fewer, shorter runs

Used to budget experiments for FP-BMA (arXiv 2406.15664) on small CPU machines.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import optax

import fpbma.models as M


def _bench(fn, *args, min_time: float, min_iters: int = 3) -> tuple[float, float]:
    """Returns (compile+first-call seconds, seconds per call) for a jitted ``fn``."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < min_time:
        jax.block_until_ready(fn(*args))
        iters += 1
    return first, (time.perf_counter() - start) / iters


def run(name: str, size: int, batch: int, min_time: float) -> dict:
    model, variables = M.create(name, 10, key=jax.random.PRNGKey(0), image_size=size)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3), jnp.float32)
    y = jnp.arange(batch) % 10
    has_stats = "batch_stats" in variables
    rngs = {"dropout": jax.random.PRNGKey(2)}

    @jax.jit
    def forward(v, x):
        return model.apply(v, x, train=False)

    @jax.jit
    def forward_backward(v, x, y):
        def loss(params):
            out = model.apply({**v, "params": params}, x, train=True, rngs=rngs,
                              mutable=["batch_stats"] if has_stats else [])
            logits, updates = out
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
        return jax.grad(loss, has_aux=True)(v["params"])

    c_fwd, t_fwd = _bench(forward, variables, x, min_time=min_time)
    c_bwd, t_bwd = _bench(forward_backward, variables, x, y, min_time=min_time)
    return dict(name=name, size=size, batch=batch, fwd=batch / t_fwd, fwd_bwd=batch / t_bwd,
                compile=c_fwd + c_bwd, ratio=t_bwd / t_fwd)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing windows")
    parser.add_argument("--min_time", type=float, default=3.0, help="seconds timed per entry")
    args = parser.parse_args()
    min_time = 0.5 if args.quick else args.min_time
    configs = [("resnet20", 32, 128), ("resnet18_small", 32, 64)]
    if importlib.util.find_spec("fpbma.models.efficientnet") is not None:
        configs += [("efficientnet_lite0", 64, 64), ("efficientnet_lite0", 224, 16)]
    else:
        print("efficientnet_lite0: fpbma/models/efficientnet.py not present, skipped")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (other processes share these cores)")
    header = f"{'model':<20}{'px':>5}{'batch':>7}{'fwd img/s':>12}{'fwd+bwd img/s':>15}" \
             f"{'bwd/fwd':>9}{'compile s':>11}"
    print(header)
    print("-" * len(header))
    for name, size, batch in configs:
        r = run(name, size, batch, min_time)
        print(f"{r['name']:<20}{r['size']:>5}{r['batch']:>7}{r['fwd']:>12.1f}{r['fwd_bwd']:>15.1f}"
              f"{r['ratio']:>9.2f}{r['compile']:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
