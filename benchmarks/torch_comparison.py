"""ResNet-18 (small stem, 32 px) SGD step: plain PyTorch beside fpbma's Flax model, same process.

Both sides run the same network (torchvision's ResNet-18 with a 3×3/1 stem and no max-pool; the
torch side is tests/models/torch_reference.py), the same batch and SGD with momentum 0.9. Timing is
round-robin (one torch step, one JAX step, ...) so load from other processes hits both alike;
medians over ``--steps``. Rows:

* ``sgd f32``: the library's jitted, donated step (:func:`fpbma.parallel.make_train_step`), NHWC;
* ``sgd bf16``: the same with ``compute_dtype=bfloat16`` (weights/activations bf16, θ float32);
* ``forward``: inference forward only (torch ``no_grad`` + ``eval``; JAX ``train=False``);
* ``conv NHWC`` / ``conv NCHW``: one 64→64 3×3 convolution (batch, 32×32), forward only, in
  ``lax.conv_general_dilated`` with either layout, against ``torch.nn.functional.conv2d``.

XLA flags must be set before JAX starts, so ``--flags`` variants each run this script in a fresh
subprocess (``--child``) and report their own same-process ratios.

    PYTHONPATH=. python -m benchmarks.torch_comparison                  # default + flag variants
    PYTHONPATH=. python -m benchmarks.torch_comparison --steps 30 --no-variants
    PYTHONPATH=. python -m benchmarks.torch_comparison --torch-threads 1 \
        --flags=--xla_cpu_multi_thread_eigen=false,--xla_cpu_use_onednn=true
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLAG_VARIANTS = [
    "",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_use_thunk_runtime=false",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_enable_fast_math=true",
]


def torch_setup(batch, seed=0, threads=None):
    import torch
    from torch import nn

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from tests.models import torch_reference

    torch.manual_seed(seed)
    model = torch_reference.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # small stem, as fpbma's resnet18_small
    model.maxpool = nn.Identity()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.arange(batch) % 10

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    def forward():
        model.eval()
        with torch.no_grad():
            return model(x)

    w = torch.randn(64, 64, 3, 3)
    xc = torch.randn(batch, 64, 32, 32)

    def conv():
        with torch.no_grad():
            return nn.functional.conv2d(xc, w, padding=1)

    return {"sgd": step, "forward": forward, "conv": conv}, torch.get_num_threads()


def jax_setup(batch):
    import jax
    import jax.numpy as jnp

    import fpbma.baselines as B
    import fpbma.models as M
    from fpbma import parallel
    from benchmarks.transfer_step_cost import cross_entropy

    key = jax.random.PRNGKey(0)
    model, variables = M.create("resnet18_small", 10, key=key)
    x = jax.random.normal(key, (batch, 32, 32, 3))
    y = jnp.arange(batch) % 10
    mesh = parallel.data_mesh(jax.devices()[:1])
    data = parallel.shard_batch({"image": x, "label": y}, mesh)

    def loss(w, ms, b, k):
        logits, upd = model.apply({"params": w, **ms}, b["image"], train=True, mutable=["batch_stats"])
        return cross_entropy(logits, b["label"]), upd

    fns = {}
    for name, dtype in (("sgd", None), ("sgd_bf16", jnp.bfloat16)):
        tx = B.sgd(0.01, momentum=0.9)
        step = parallel.make_data_parallel_step(parallel.make_train_step(loss, tx, compute_dtype=dtype), mesh)
        holder = [parallel.replicate(parallel.TrainState.create(variables["params"], tx,
                                                                {"batch_stats": variables["batch_stats"]}), mesh)]

        def run(step=step, holder=holder):
            holder[0], m = step(holder[0], data, key)
            return holder[0], m
        fns[name] = run
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
    fns["forward"] = lambda: fwd(variables, x)
    w_hwio = jax.random.normal(key, (3, 3, 64, 64))
    x_nhwc = jax.random.normal(key, (batch, 32, 32, 64))
    x_nchw = jnp.transpose(x_nhwc, (0, 3, 1, 2))
    w_oihw = jnp.transpose(w_hwio, (3, 2, 0, 1))
    conv_nhwc = jax.jit(lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 1), "SAME",
                                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")))
    conv_nchw = jax.jit(lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 1), "SAME",
                                                                  dimension_numbers=("NCHW", "OIHW", "NCHW")))
    fns["conv_nhwc"] = lambda: conv_nhwc(x_nhwc, w_hwio)
    fns["conv_nchw"] = lambda: conv_nchw(x_nchw, w_oihw)
    return fns


def measure(batch, steps, torch_threads=None):
    import jax

    torch_fns, threads = torch_setup(batch, threads=torch_threads)
    jax_fns = jax_setup(batch)
    pairs = {"sgd f32": ("sgd", "sgd"), "sgd bf16": ("sgd", "sgd_bf16"), "forward": ("forward", "forward"),
             "conv NHWC": ("conv", "conv_nhwc"), "conv NCHW": ("conv", "conv_nchw")}
    for fn in list(torch_fns.values()) + list(jax_fns.values()):  # warm-up and compile
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    times = {("torch", k): [] for k in torch_fns} | {("jax", k): [] for k in jax_fns}
    for _ in range(steps):
        for (side, k), acc in times.items():
            fn = torch_fns[k] if side == "torch" else jax_fns[k]
            t0 = time.perf_counter()
            jax.block_until_ready(fn()) if side == "jax" else fn()
            acc.append(time.perf_counter() - t0)
    med = {f"{side}:{k}": statistics.median(v) for (side, k), v in times.items()}
    rows = {label: (med[f"torch:{t}"], med[f"jax:{j}"]) for label, (t, j) in pairs.items()}
    return {"rows": rows, "torch_threads": threads, "load": os.getloadavg()[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default); "
                        "OpenMP spin-waiting degrades badly when other processes oversubscribe the cores")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-variants", action="store_true", help="only the default XLA flags")
    parser.add_argument("--flags", metavar="XLA_FLAGS,...", help="run only these comma-separated XLA_FLAGS "
                        "variants ('default' for none), e.g. --flags=default,--xla_cpu_use_onednn=true")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.batch, args.steps, args.torch_threads)))
        return
    print(f"ResNet-18 small stem, 32 px, batch {args.batch}, median of {args.steps} round-robin steps; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print("| XLA_FLAGS | op | torch ms | JAX ms | JAX/torch | torch threads | load |")
    print("|---|---|---|---|---|---|---|")
    variants = FLAG_VARIANTS if args.flags is None else ["" if f == "default" else f
                                                          for f in args.flags.split(",")]
    for flags in ([""] if args.no_variants else variants):
        env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-m", "benchmarks.torch_comparison", "--child", "--batch",
                               str(args.batch), "--steps", str(args.steps), "--torch-threads",
                               str(args.torch_threads)], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
            print(f"| `{flags or '(default)'}` | failed: {err} | | | | | |", flush=True)
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        for label, (t_torch, t_jax) in r["rows"].items():
            print(f"| `{flags or '(default)'}` | {label} | {1e3 * t_torch:.1f} | {1e3 * t_jax:.1f} | "
                  f"{t_jax / t_torch:.2f} | {r['torch_threads']} | {r['load']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
