"""Step cost of FP-BMA relative to SGD and SAM on the same model and batch, measured in one process.

FP-BMA needs two forward+backward passes per step (clean and perturbed), so its physical floor is
2.0× an SGD step; the Fisher products add O(P) (diagonal) or O(P K²) (low rank) work.

    python -m benchmarks.step_cost            # MLP and small CNN, median of 30 jitted steps
    python -m benchmarks.step_cost --steps 50

Prints milliseconds per step and the ratios FP-BMA/SGD and SAM/SGD, and FP-BMA / one-pass VI on the same
posterior: a reparameterised VI step alone costs more than SGD when the model is parameter-bound (an
MLP), so the second ratio isolates what FP-BMA itself adds (floor 2.0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import optax.contrib

import fpbma


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(512)(x))
        x = nn.relu(nn.Dense(512)(x))
        return nn.Dense(10)(x)


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(nn.relu(nn.Dense(128)(x)))


def _loss(model, params, x, y):
    logits = model.apply({"params": params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))


def make_steps(model, params, x, y):
    """Jitted (state → state) steps for every method, each closed over the same batch."""
    loss = lambda p: _loss(model, p, x, y)
    steps = {}
    fresh = lambda t: jax.tree.map(jnp.copy, t)  # each method's carry is donated, so none may share buffers

    sgd = optax.sgd(0.01, momentum=0.9)

    def sgd_step(carry, _):
        p, s = carry
        u, s = sgd.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, u), s)
    steps["sgd"] = (jax.jit(sgd_step, donate_argnums=0), (fresh(params), sgd.init(params)))

    sam = optax.contrib.sam(optax.sgd(0.01, momentum=0.9), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
                            sync_period=2, opaque_mode=True)

    def sam_step(carry, _):
        p, s = carry
        u, s = sam.update(jax.grad(loss)(p), s, p, grad_fn=lambda p_, i: jax.grad(loss)(p_))
        return (optax.apply_updates(p, u), s)
    steps["sam"] = (jax.jit(sam_step, donate_argnums=0), (fresh(params), sam.init(params)))

    tx = fpbma.fpbma(0.01, rho=0.05)
    vi = optax.sgd(0.01, momentum=0.9)  # plain one-pass VI on the same posterior: FP-BMA's own baseline
    for family, q in [("diag", fpbma.DiagGaussian.from_point(params, 1e-3)),
                      ("lowrank-K5", fpbma.LowRankGaussian.from_point(params, 1e-3, rank=5))]:
        if isinstance(q, fpbma.LowRankGaussian):
            q = q._replace(cov_factor=jax.tree.map(lambda d: d + 1e-4, q.cov_factor))

        def vi_step(carry, key):
            q, s = carry
            noise = fpbma.sample_noise(q, key)
            u, s = vi.update(jax.grad(lambda t: fpbma.negative_elbo(t, noise, loss))(q), s, q)
            return (optax.apply_updates(q, u), s)

        def fpbma_step(carry, key):
            q, s = carry
            noise = fpbma.sample_noise(q, key)
            grad_fn = jax.grad(lambda t: fpbma.negative_elbo(t, noise, loss))
            u, s = tx.update(grad_fn(q), s, q, grad_fn=grad_fn)
            return (optax.apply_updates(q, u), s)
        steps[f"vi-{family}"] = (jax.jit(vi_step, donate_argnums=0), (fresh(q), vi.init(q)))
        steps[f"fpbma-{family}"] = (jax.jit(fpbma_step, donate_argnums=0), (fresh(q), tx.init(q)))
    return steps


def time_step(step, carry, n_steps, warmup=3):
    key = jax.random.PRNGKey(0)
    for i in range(warmup):
        carry = step(carry, jax.random.fold_in(key, i))
    jax.block_until_ready(carry)
    times = []
    for i in range(n_steps):
        start = time.perf_counter()
        carry = step(carry, jax.random.fold_in(key, warmup + i))
        jax.block_until_ready(carry)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method (>= 20 recommended)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    key = jax.random.PRNGKey(0)
    setups = {
        "MLP 64-512-512-10, batch 256": (MLP(), jax.random.normal(key, (256, 64))),
        "CNN 2 conv + 2 dense, 32x32x3, batch 64": (SmallCNN(), jax.random.normal(key, (64, 32, 32, 3))),
    }
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; median of {args.steps} jitted steps")
    print("| model | P | method | ms/step | ratio to SGD | ratio to one-pass VI (same posterior) |")
    print("|---|---|---|---|---|---|")
    for title, (model, x) in setups.items():
        y = jax.random.randint(key, (x.shape[0],), 0, 10)
        params = model.init(key, x)["params"]
        p = fpbma.num_parameters(params)
        results = {name: time_step(step, carry, args.steps) for name, (step, carry) in make_steps(model, params, x, y).items()}
        for name, t in results.items():
            vi = results.get("vi-" + name.split("-", 1)[1]) if name.startswith("fpbma-") else None
            vs_vi = f"{t / vi:.2f}" if vi else ""
            print(f"| {title} | {p:,} | {name} | {1e3 * t:.2f} | {t / results['sgd']:.2f} | {vs_vi} |")


if __name__ == "__main__":
    main()
