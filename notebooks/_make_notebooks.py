"""Writes notebooks/02_transfer_learning.ipynb and notebooks/03_flatness.ipynb with outputs stripped.

    python notebooks/_make_notebooks.py            # regenerate both
    python notebooks/_make_notebooks.py --script 02  # print notebook 02's code cells as one script

The notebooks are generated (not hand-edited) so their text and code stay reviewable as plain Python;
CI executes them with nbclient in QUICK mode (tests/test_notebooks.py).
"""

from __future__ import annotations

import pathlib
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent

INSTALL = '''\
# Colab: install fpbma if it is not importable yet, from a wheel uploaded next to the notebook
# (`pip wheel --no-deps .` in a checkout makes fpbma-*.whl) or else from the git repository.
import glob, importlib.util, os, subprocess, sys
if importlib.util.find_spec("fpbma") is None:
    REPO = os.environ.get("FPBMA_REPO", "https://github.com/fpbma/fpbma")  # or the URL of your clone/fork
    wheels = sorted(glob.glob("fpbma-*.whl"))
    source = wheels[-1] if wheels else f"git+{REPO}"
    print("installing fpbma from", source)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", source], check=True)'''


def md(text: str):
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text: str):
    return nbformat.v4.new_code_cell(text.strip("\n"))


# ----------------------------------------------------------------------------------------------
# 02: Bayesian transfer learning.

TRANSFER = [
    md(r"""
# Bayesian transfer learning with FP-BMA, step by step

The transfer scheme of Lim et al. (arXiv:2406.15664, §4) with the library's building blocks:

1. **pre-train** a network on a source task (here the offline MNIST subset, 4,000 images);
2. fit a **SWAG prior** $p(w)=\mathcal N\big(\bar w,\ \tfrac12(\operatorname{diag}\sigma^2 + DD^\top/(K-1))\big)$ along SGD on the source;
3. choose a **Bayesian subset** $S$ (`nl_ll`: normalisation layers + a new head); the rest $F$ is frozen but still *drawn from the prior*;
4. train $q_\theta(w_S)$ on a few-shot target (sklearn's real 8×8 digits) with **FP-BMA**, and SGD for comparison;
5. **BMA** $\;\bar p(y\mid x)=\frac1S\sum_s p(y\mid x, w_S^{(s)}, w_F^{(s)})$, $w_S^{(s)}\sim q$, $w_F^{(s)}\sim p_F$;
6. ACC / NLL / ECE with and without **temperature scaling**, accuracy under **corruptions**, a **reliability diagram**.

It runs on CPU, GPU or a Colab TPU: every training step is jit-sharded over a `fpbma.parallel.data_mesh()` of
`jax.device_count()` devices. Set `FPBMA_QUICK=1` (CI does) for a run of a few seconds per stage; the full mode takes a
few minutes on a CPU.
"""),
    code(INSTALL),
    code(r'''
import os, time
QUICK = os.environ.get("FPBMA_QUICK") == "1"
if QUICK:  # smoke runs (CI): tiny programs, so skip LLVM's slow optimisations; compiling dominates the run time
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
from flax import traverse_util
from jax.tree_util import Partial
import fpbma
from fpbma import calibration, metrics, parallel, transfer
from fpbma.data import corruptions
from fpbma.models import partition
from fpbma.models.resnet import CifarResNet

print("backend:", jax.default_backend(), "| devices:", jax.devices())
n_dev = jax.device_count()
mesh = parallel.data_mesh()                # 1-D mesh over every device, axis "data"

def multiple_of_devices(b):                # training batches are split evenly over the devices
    return -(-b // n_dev) * n_dev

IMG = 12 if QUICK else 16                  # both datasets are resized to IMG x IMG
WIDTH = 8                                  # CifarResNet-8 of width 8 (~20k weights)
PRETRAIN_STEPS = 60 if QUICK else 600
PRIOR_STEPS, RANK, COLLECT = (20, 3, 5) if QUICK else (150, 5, 10)
K_SHOT = 5 if QUICK else 10                # target examples per class (and as many for validation)
TRANSFER_STEPS = 40 if QUICK else 150       # as experiments/configs/base.py
S = 5 if QUICK else 30                     # BMA samples
CORRUPTIONS = ("gaussian_noise", "motion_blur", "contrast", "fog")
SEVERITIES = (1, 3, 5) if QUICK else (1, 2, 3, 4, 5)
PER_CLASS = 5 if QUICK else 10             # test images per class in the corruption sweep
t_start = time.perf_counter()
'''),
    md(r"""
## Data: MNIST (source) → few-shot digits (target)

Both come from `fpbma.data.load` (built offline on first use). The target gets `K_SHOT` training and `K_SHOT`
validation images per class (`few_shot_split`); the whole 355-image test split is used for evaluation. Images are
resized to a common size and scaled to $[-1, 1]$.
"""),
    code(r'''
def arrays(name, split):
    src = fpbma.data.load(name, split)
    ex = src.get_batch(list(range(len(src))))
    return np.stack([e["image"] for e in ex]).astype(np.uint8), np.array([e["label"] for e in ex], np.int32)

def resize(images, size=IMG):              # uint8 (N, H, W, C) -> uint8 (N, size, size, C)
    x = jax.image.resize(jnp.asarray(images, jnp.float32), (len(images), size, size, images.shape[-1]),
                         "bilinear", antialias=True)
    return np.asarray(jnp.clip(jnp.round(x), 0, 255)).astype(np.uint8)

def normalise(images):                     # uint8 -> float32 in [-1, 1]
    return (images.astype(np.float32) / 255.0 - 0.5) / 0.5

src_raw, src_y = arrays("mnist", "train")
src_test_raw, src_test_y = arrays("mnist", "test")
tgt_raw, tgt_y = arrays("digits", "train")
test_raw, test_y = arrays("digits", "test")
split = fpbma.data.few_shot_split(fpbma.data.load("digits", "train"), K_SHOT, seed=0, val_per_class=K_SHOT)

x_src, x_src_test = normalise(resize(src_raw)), normalise(resize(src_test_raw))
x_few, y_few = normalise(resize(tgt_raw[split.train])), tgt_y[split.train]
x_val, y_val = normalise(resize(tgt_raw[split.validation])), tgt_y[split.validation]
x_test = normalise(resize(test_raw))
print(f"source {x_src.shape} | target train {x_few.shape} val {x_val.shape} test {x_test.shape}")

fig, axes = plt.subplots(2, 8, figsize=(9, 2.4))
for i in range(8):
    axes[0, i].imshow(x_src[i, ..., 0], cmap="gray"); axes[0, i].set_title(int(src_y[i]), fontsize=8)
    axes[1, i].imshow(x_few[i * len(x_few) // 8, ..., 0], cmap="gray")
    axes[1, i].set_title(int(y_few[i * len(x_few) // 8]), fontsize=8)
for ax in axes.ravel():
    ax.axis("off")
fig.suptitle("source (MNIST, top) and few-shot target (digits, bottom)", fontsize=9)
plt.tight_layout(); plt.show()
'''),
    md(r"""
## 1. Pre-training on the source (data-parallel SGD)

A compact `CifarResNet` (one BasicBlock per stage, torch-style BatchNorm) minimises the cross-entropy
$\frac1B\sum_i -\log \operatorname{softmax}(f(x_i; w))_{y_i}$ with SGD + momentum + weight decay, BatchNorm in train
mode. `parallel.make_train_step` builds a pure `step(state, batch, key)`; `parallel.make_data_parallel_step` jits it
with the state replicated and the batch split over the `"data"` axis, so the gradient
$g=\sum_d \frac{B_d}{B} g_d$ (and the BatchNorm statistics) are those of the global batch on any number of devices.
"""),
    code(r'''
def xent(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))

def batch_at(x, y, batch_size, seed, step):   # a fresh random mini-batch per step, reproducible
    idx = np.random.default_rng([seed, step]).choice(len(x), batch_size, replace=False)
    return {"image": x[idx], "label": y[idx]}

src_model = CifarResNet(num_blocks=1, num_classes=10, width=WIDTH)
src_vars = src_model.init(jax.random.PRNGKey(0), jnp.zeros((1, IMG, IMG, 1)), train=False)

def source_loss(params, model_state, batch, key):
    logits, new_state = src_model.apply({"params": params, **model_state}, batch["image"], train=True,
                                        mutable=["batch_stats"])
    return xent(logits, batch["label"]), new_state

tx = optax.chain(optax.add_decayed_weights(5e-4),
                 optax.sgd(optax.cosine_decay_schedule(0.05, PRETRAIN_STEPS), momentum=0.9))
step = parallel.make_data_parallel_step(parallel.make_train_step(source_loss, tx), mesh)
state = parallel.replicate(parallel.TrainState.create(src_vars["params"], tx,
                                                      {"batch_stats": src_vars["batch_stats"]}), mesh)
B = multiple_of_devices(64)
t0 = time.perf_counter()
for t in range(PRETRAIN_STEPS):
    state, m = step(state, parallel.shard_batch(batch_at(x_src, src_y, B, 0, t), mesh), jax.random.PRNGKey(0))
source = {"params": state.params, **state.model_state}
src_logits = jax.jit(lambda v, x: src_model.apply(v, x, train=False))(source, x_src_test)
print(f"pre-trained {PRETRAIN_STEPS} steps (batch {B}) in {time.perf_counter() - t0:.1f}s; last loss "
      f"{float(m['loss']):.3f}; MNIST test accuracy {float(metrics.accuracy(jax.nn.log_softmax(src_logits), src_test_y)):.3f}")
'''),
    md(r"""
## 2. The SWAG prior

`transfer.fit_swag_prior` continues SGD on the source with a small constant rate and, every $c$ steps, records the
model: first and second moments $\bar w,\ \overline{w^2}$ and the last $K$ deviations $D=[w_k-\bar w]$. The prior is

$$p(w)=\mathcal N\Big(\bar w,\ \tfrac12\big(\operatorname{diag}\max(\overline{w^2}-\bar w^2,\,v_{\min}) + \tfrac{DD^\top}{K-1}\big)\Big),$$

a `fpbma.LowRankGaussian` over every weight except the source head (the target gets a new one).
"""),
    code(r'''
stats = source["batch_stats"]

def swag_loss(p, batch):                   # SWAG follows the source training: BatchNorm in train mode
    logits, _ = src_model.apply({"params": p, "batch_stats": stats}, batch[0], train=True, mutable=["batch_stats"])
    return xent(logits, batch[1])

t0 = time.perf_counter()
prior_batches = [tuple(batch_at(x_src, src_y, 64, 1, t).values()) for t in range(PRIOR_STEPS)]
prior = transfer.fit_swag_prior(swag_loss, source["params"], prior_batches, learning_rate=0.01, rank=RANK,
                                collect_every=COLLECT, min_var=1e-8)
print(f"SWAG prior from {PRIOR_STEPS} steps in {time.perf_counter() - t0:.1f}s: rank K={prior.rank}, "
      f"{fpbma.num_parameters(prior.mean)} weights")
'''),
    md(r"""
## 3. The Bayesian subset (`nl_ll`) and the frozen rest

`transfer.make_scheme` splits the prior: $p = p_S\,p_F$ restricted to the subset $S$ (BatchNorm scales/offsets and the
new head) and the frozen rest $F$. Restricting a low-rank Gaussian to coordinates is exact: the marginal keeps the rows
of $D$ of those coordinates. $q_\theta(w_S)$ starts at the prior's marginal, except the new head
$\sim\mathcal N(0,\alpha I)$; the KL term covers $S$ minus the head (which has no informative prior), with the
variances floored at `kl_min_var` so the KL gradient $\Sigma_p^{-1}(\mu_q-\mu_p)/N$ stays tame.
"""),
    code(r'''
model = CifarResNet(num_blocks=1, num_classes=10, width=WIDTH)   # the target network (new head)
tgt_vars = model.init(jax.random.PRNGKey(1), jnp.zeros((1, IMG, IMG, 1)), train=False)
scheme = transfer.make_scheme(prior, tgt_vars["params"], "nl_ll", alpha=1e-4, kl_min_var=1e-3)
subset, frozen = partition.split(tgt_vars["params"], "nl_ll")
print(f"Bayesian subset: {partition.count(subset)} weights | frozen (sampled from the prior): {partition.count(frozen)}")
print("subset leaves:", ", ".join("/".join(p) for p in sorted(traverse_util.flatten_dict(subset))[:6]), "...")
'''),
    md(r"""
## 4. FP-BMA (and SGD) on the subset

`transfer.make_trainer("fpbma", ...)` minimises the per-example negative ELBO
$L(\theta)=\mathbb E_{q_\theta}\,\ell(w_S, w_F) + \beta\,\mathrm{KL}(q_{S\setminus\text{head}}\,\|\,p_{S\setminus\text{head}})/N$,
$w_F\sim p_F$, with the Fisher-weighted sharpness-aware step

$$\Delta^*=\rho\,\frac{F_\theta^{-1}g}{\sqrt{g^\top F_\theta^{-1}g}},\qquad \theta\leftarrow\theta-\eta\,\nabla_\theta L(\theta+\Delta^*),$$

both passes sharing the reparameterisation noise. `"sgd"` trains a point estimate of $w_S$ from the prior mean; its
BMA varies only the frozen weights. The trainer's pure `step` is wrapped for `parallel.make_data_parallel_step`.
"""),
    code(r'''
apply = Partial(lambda variables, x: model.apply(variables, x, train=False))  # one compiled BMA per shape
extra = {"batch_stats": source["batch_stats"]}  # the source BatchNorm statistics, eval mode
B_T = multiple_of_devices(min(50, len(x_few)))

def train(method):
    trainer = transfer.make_trainer(method, scheme, lambda p, im: apply({**extra, "params": p}, im),
                                    num_data=len(x_few), num_steps=TRANSFER_STEPS, learning_rate=0.01,
                                    kl_weight=0.01,  # the experiments' defaults (README: transfer hyperparameters)
                                    hyperparameters={"rho": 0.05} if method == "fpbma" else None)
    dp_step = parallel.make_data_parallel_step(
        lambda s, b, k: (trainer.step(s, b, jax.random.fold_in(k, s.step)), {}), mesh)
    state = parallel.replicate(trainer.init(), mesh)
    t0 = time.perf_counter()
    for t in range(TRANSFER_STEPS):
        batch = parallel.shard_batch(batch_at(x_few, y_few, B_T, 2, t), mesh)
        state, _ = dp_step(state, batch, jax.random.PRNGKey(2))
    skipped = getattr(state.opt_state, "num_skipped", None)  # FP-BMA skips steps with non-finite gradients
    print(f"{method}: {TRANSFER_STEPS} steps (batch {B_T}) in {time.perf_counter() - t0:.1f}s"
          + ("" if skipped is None else f", {int(skipped)} skipped"))
    return trainer.finalize(state)

posteriors = {m: train(m) for m in ("fpbma", "sgd")}
'''),
    md(r"""
## 5. Bayesian model averaging

`transfer.sample_weights(scheme, posterior, extra)` is a sampler `key -> variables` that draws $w_S$ from the trained
posterior and $w_F$ from the prior and merges them. `parallel.evaluate_sharded` runs `fpbma.bma.predict` with the
examples split over the devices (padded to a multiple of the device count, padding dropped):

$$\log\bar p(y\mid x)=\operatorname{logsumexp}_s\log\operatorname{softmax}f(x;w^{(s)})_y-\log S .$$

The validation, test and corrupted test images go through one call per method (one compilation), with the same $S$
weight samples for every image.
"""),
    code(r'''
# Corrupted copies of a stratified test subset (the corruption acts on the raw 8x8 digits, then the same resize).
sub = np.sort(np.concatenate([np.flatnonzero(test_y == c)[:PER_CLASS] for c in range(10)]))
y_sub = test_y[sub]
corrupted = {(c, s): normalise(resize(corruptions.corrupt(test_raw[sub], c, s, seed=0, indices=sub)))
             for c in CORRUPTIONS for s in SEVERITIES}
blocks = {"val": x_val, "test": x_test, **corrupted}
all_images = np.concatenate(list(blocks.values()))
offsets = np.cumsum([0] + [len(b) for b in blocks.values()])

log_probs = {}
for method, posterior in posteriors.items():
    t0 = time.perf_counter()
    sampler = transfer.sample_weights(scheme, posterior, extra)
    lp = np.asarray(parallel.evaluate_sharded(apply, sampler, all_images, mesh, key=jax.random.PRNGKey(3),
                                              num_samples=S))
    log_probs[method] = {k: lp[a:b] for k, a, b in zip(blocks, offsets[:-1], offsets[1:])}
    print(f"{method}: BMA over S={S} samples on {len(all_images)} images in {time.perf_counter() - t0:.1f}s")
'''),
    md(r"""
## 6. Metrics, with and without temperature scaling

ECE uses 15 equal-width confidence bins. Temperature scaling fits one $T$ on the validation split,
$T=\arg\min_T -\frac1N\sum_n\log\operatorname{softmax}(\log\bar p(\cdot\mid x_n)/T)_{y_n}$, and rescales the test
predictive; accuracy is unchanged by construction, NLL and ECE are not.
"""),
    code(r'''
results = {m: calibration.calibrated_metrics(lp["val"], y_val, lp["test"], test_y) for m, lp in log_probs.items()}
print("| method | T | ACC | NLL | ECE | NLL (TS) | ECE (TS) |")
print("|---|---|---|---|---|---|---|")
for m, r in results.items():
    raw, ts = r["raw"], r["scaled"]
    print(f"| {m} | {r['temperature']:.2f} | {raw['acc']:.4f} | {raw['nll']:.4f} | {raw['ece']:.4f} | "
          f"{ts['nll']:.4f} | {ts['ece']:.4f} |")
'''),
    md(r"""
## 7. Accuracy under corruptions

ImageNet-C-style corruptions (`fpbma.data.corruptions.corrupt`, CIFAR-10-C parameter tables) at increasing severity,
on a stratified subset of `PER_CLASS` test images per class; severity 0 is the same subset uncorrupted.
"""),
    code(r'''
fig, axes = plt.subplots(1, len(CORRUPTIONS), figsize=(3.2 * len(CORRUPTIONS), 3), sharey=True)
for ax, c in zip(axes, CORRUPTIONS):
    for m, lp in log_probs.items():
        accs = [float(metrics.accuracy(lp["test"][sub], y_sub))] + [float(metrics.accuracy(lp[(c, s)], y_sub))
                                                                      for s in SEVERITIES]
        ax.plot((0,) + SEVERITIES, accs, marker="o", label=m)
    ax.set(title=c, xlabel="severity")
    ax.grid(alpha=0.3)
axes[0].set_ylabel("BMA accuracy"); axes[0].legend()
plt.tight_layout(); plt.show()
for m, lp in log_probs.items():
    mean_acc = np.mean([float(metrics.accuracy(lp[k], y_sub)) for k in corrupted])
    print(f"{m}: mean accuracy over {len(corrupted)} corruption x severity sets = {mean_acc:.4f}")
'''),
    md(r"""
## 8. Reliability diagrams

Accuracy per confidence bin against the diagonal (perfect calibration), before and after temperature scaling.
"""),
    code(r'''
fig, axes = plt.subplots(1, 4, figsize=(14, 3.4), sharey=True)
panels = [(m, kind) for m in log_probs for kind in ("raw", "TS")]
for ax, (m, kind) in zip(axes, panels):
    lp = log_probs[m]["test"]
    if kind == "TS":
        lp = calibration.apply_temperature(lp, results[m]["temperature"])
    count, conf, acc = (np.asarray(a) for a in metrics.calibration_bins(lp, test_y, 15))
    centers = (np.arange(15) + 0.5) / 15
    ax.bar(centers, np.where(count > 0, acc, 0), width=1 / 15, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set(title=f"{m} ({kind})  ECE={float(metrics.ece(lp, test_y)):.3f}", xlabel="confidence")
axes[0].set_ylabel("accuracy"); axes[0].legend(loc="upper left", fontsize=8)
plt.tight_layout(); plt.show()
print(f"total wall time {time.perf_counter() - t_start:.0f}s")
'''),
    md(r"""
The numbers above come from one seed and a short run; which method wins on which metric depends on the run (seed,
steps, ρ, K). `python -m experiments.transfer` runs the same pipeline for all eleven methods with checkpoints,
several seeds and every corruption.
"""),
]


# ----------------------------------------------------------------------------------------------
# 03: flatness of posteriors.

FLATNESS = [
    md(r"""
# How flat are the posteriors? Hessian spectra and loss landscapes

Lim et al. (arXiv:2406.15664) make two empirical claims: **(1)** approximate Bayesian inference such as plain VI rarely
finds *flat* posteriors, which FP-BMA's sharpness-aware step is designed to fix, and **(2)** BMA over flatter samples
generalises better. This notebook measures both on real data with `fpbma.flatness`:

* a Bayesian MLP on sklearn's 8×8 digits trained with plain mean-field VI ($\rho=0$) and with FP-BMA ($\rho>0$),
  otherwise identical (same initialisation, data order, optimizer and step count);
* at $S$ samples $w_s\sim q$: the top Hessian eigenvalues $\lambda_1\ge\dots\ge\lambda_5$ of the training loss
  (Lanczos) and its trace $\operatorname{tr}H$ (Hutchinson) — `posterior_flatness`;
* 1-D and 2-D loss landscapes around the posterior means (filter-normalised directions, Li et al. 2018);
* BMA over the flattest vs the sharpest half of the samples.

Every number below is computed by the code; which way the comparisons go depends on the run (seed, $\rho$, steps).
Set `FPBMA_QUICK=1` (CI does) for a run of a few seconds.
"""),
    code(INSTALL),
    code(r'''
import os, time
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
import fpbma
import fpbma.flatness as flatness
from fpbma import metrics, parallel
from fpbma.baselines import SampleSet

QUICK = os.environ.get("FPBMA_QUICK") == "1"
print("backend:", jax.default_backend(), "| devices:", jax.devices())
n_dev = jax.device_count()
mesh = parallel.data_mesh()                 # 1-D mesh over every device, axis "data"

STEPS = 300 if QUICK else 3000              # training steps per method
BATCH = -(-128 // n_dev) * n_dev            # a multiple of the device count
HIDDEN, PRIOR_STD, INIT_STD = 128, 0.3, 0.02
RHO = 0.5                                   # FP-BMA's KL-ball radius (0 is plain VI)
S = 8 if QUICK else 30                      # posterior samples measured (and averaged)
TRACE_PROBES = 10 if QUICK else 100         # Hutchinson probes per sample
GRID_1D, GRID_2D = (21, 11) if QUICK else (51, 31)
t_start = time.perf_counter()
'''),
    md(r"""
## Data and model

1,442 training and 355 test digits from `fpbma.data.load("digits", ...)`, pixels in $[0,1]$; a 64–128–10 ReLU MLP;
prior $p(w)=\mathcal N(0, 0.3^2 I)$; posterior a `fpbma.DiagGaussian` $q=\mathcal N(\mu,\operatorname{diag}\sigma^2)$.
"""),
    code(r'''
def arrays(split):
    src = fpbma.data.load("digits", split)
    ex = src.get_batch(list(range(len(src))))
    x = np.stack([e["image"] for e in ex]).reshape(len(ex), -1).astype(np.float32) / 255.0
    return jnp.asarray(x), jnp.asarray(np.array([e["label"] for e in ex], np.int32))

x_tr, y_tr = arrays("train")
x_te, y_te = arrays("test")
N = x_tr.shape[0]

def init_mlp(key, sizes=(64, HIDDEN, 10)):
    ks = jax.random.split(key, len(sizes) - 1)
    return {f"dense{i}": {"w": jax.random.normal(k, (m, n)) * np.sqrt(2 / m), "b": jnp.zeros(n)}
            for i, (k, m, n) in enumerate(zip(ks, sizes[:-1], sizes[1:]))}

def mlp(w, x):
    h = jax.nn.relu(x @ w["dense0"]["w"] + w["dense0"]["b"])
    return h @ w["dense1"]["w"] + w["dense1"]["b"]

def xent(w, x, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(mlp(w, x)), y[:, None], -1))

def train_loss(w):                          # the full-data training loss whose Hessian we measure
    return xent(w, x_tr, y_tr)

params0 = init_mlp(jax.random.PRNGKey(0))
prior = fpbma.DiagGaussian.from_point(jax.tree.map(jnp.zeros_like, params0), PRIOR_STD)
print(f"train {x_tr.shape}, test {x_te.shape}, {fpbma.num_parameters(params0)} weights")
'''),
    md(r"""
## Training: plain VI vs FP-BMA (data-parallel)

Both minimise the per-example negative ELBO $L(\theta)=\mathbb E_{\varepsilon}\,\ell(\mu+\sigma\odot\varepsilon)+\mathrm{KL}(q_\theta\|p)/N$
with `fpbma.fpbma`; FP-BMA evaluates the gradient at the Fisher-weighted worst case in a KL ball,
$\theta+\Delta^*$ with $\Delta^*=\rho F_\theta^{-1}g/\sqrt{g^\top F_\theta^{-1}g}$, and $\rho=0$ is plain VI.
`parallel.make_train_step` draws $\varepsilon$ once per step (shared by both passes) and
`parallel.make_data_parallel_step` splits each batch over the devices. The radius $\rho$ bounds the KL divergence of
the worst case from $q$ (roughly, how many posterior standard deviations it may move); `RHO` = 0.5 here — vary it
(0 recovers VI, 0.05 is the library default). Both posteriors start at $\sigma=0.02$.
"""),
    code(r'''
def loss_fn(w, model_state, batch, key):
    return xent(w, batch["x"], batch["y"]), model_state

def train(rho):
    tx = fpbma.fpbma(0.05, rho=rho, momentum=0.9)
    q0 = fpbma.DiagGaussian.from_point(params0, INIT_STD)
    step = parallel.make_data_parallel_step(parallel.make_train_step(loss_fn, tx, prior=prior, num_data=N), mesh)
    state = parallel.replicate(parallel.TrainState.create(q0, tx), mesh)
    losses, t0 = [], time.perf_counter()
    for idx in batch_idx:
        state, m = step(state, parallel.shard_batch({"x": x_tr[idx], "y": y_tr[idx]}, mesh), jax.random.PRNGKey(1))
        losses.append(m["loss"])
    print(f"rho={rho}: {STEPS} steps in {time.perf_counter() - t0:.1f}s")
    return state.params, np.asarray(losses)

batch_idx = np.stack([np.random.default_rng([1, t]).choice(N, BATCH, replace=False) for t in range(STEPS)])
posteriors, curves = {}, {}     # same initialisation, data order and noise keys for both methods
for name, rho in (("VI", 0.0), ("FP-BMA", RHO)):
    posteriors[name], curves[name] = train(rho)

def bma_metrics(weights):                   # BMA over stacked samples -> ACC / NLL / ECE on the test split
    lp = metrics.bma_log_predictive(jax.vmap(lambda w: mlp(w, x_te))(weights))
    return {"acc": float(metrics.accuracy(lp, y_te)), "nll": float(metrics.nll(lp, y_te)),
            "ece": float(metrics.ece(lp, y_te))}

samples = {m: fpbma.sample(q, jax.random.PRNGKey(2), S) for m, q in posteriors.items()}
bma = {m: bma_metrics(w) for m, w in samples.items()}
plt.figure(figsize=(5, 3))
for m, c in curves.items():
    plt.plot(np.convolve(c, np.ones(20) / 20, "valid"), label=m)
plt.xlabel("step"); plt.ylabel("mini-batch loss (moving mean)"); plt.legend(); plt.tight_layout(); plt.show()
'''),
    md(r"""
## Claim 1: flatness of the two posteriors

`flatness.posterior_flatness` evaluates, at each of the $S$ samples $w_s$, the top-5 eigenvalues of
$H_s=\nabla^2_w\ell(w_s)$ by Lanczos (Hessian-vector products $Hv=\frac{d}{dt}\nabla\ell(w+tv)|_{t=0}$, forward over
reverse) and Hutchinson's trace $\operatorname{tr}H\approx\frac1n\sum_i z_i^\top Hz_i$ with Rademacher $z_i$. Smaller
$\lambda_{\max}$ and $\operatorname{tr}H$ mean a flatter loss around the samples. The same samples feed the BMA metrics.
"""),
    code(r'''
flat = {}
for m, w in samples.items():
    t0 = time.perf_counter()
    # A SampleSet with num_samples=None measures exactly these S samples, in order.
    flat[m] = flatness.posterior_flatness(train_loss, SampleSet(w), jax.random.PRNGKey(3), num_samples=None, k=5,
                                          trace_samples=TRACE_PROBES)
    print(f"{m}: flatness of {S} samples in {time.perf_counter() - t0:.1f}s")

print(f"\n| posterior | λ_max (mean ± std) | λ1/λ5 | tr H (mean ± std) | BMA ACC | BMA NLL | BMA ECE |")
print("|---|---|---|---|---|---|---|")
for m, f in flat.items():
    s = f.summary()
    print(f"| {m} | {s['lambda_max'][0]:.3f} ± {s['lambda_max'][1]:.3f} | {s['eigenvalue_ratio'][0]:.2f} | "
          f"{s['trace'][0]:.2f} ± {s['trace'][1]:.2f} | {bma[m]['acc']:.4f} | {bma[m]['nll']:.4f} | {bma[m]['ece']:.4f} |")
lam = {m: f.summary()["lambda_max"][0] for m, f in flat.items()}
tr = {m: f.summary()["trace"][0] for m, f in flat.items()}
print(f"\nOn this run the FP-BMA samples have a {'lower' if lam['FP-BMA'] < lam['VI'] else 'higher'} mean λ_max "
      f"({lam['FP-BMA']:.3f} vs {lam['VI']:.3f}) and a {'lower' if tr['FP-BMA'] < tr['VI'] else 'higher'} mean "
      f"trace ({tr['FP-BMA']:.2f} vs {tr['VI']:.2f}) than the VI samples.")
'''),
    code(r'''
# Hessian spectra: the top-5 eigenvalues at every sample, and at the posterior means.
fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
for i, (m, f) in enumerate(flat.items()):
    for j in range(5):
        axes[0].scatter(np.full(S, j + 1) + (i - 0.5) * 0.25, f.eigenvalues[:, j], s=10, alpha=0.6,
                        color=f"C{i}", label=m if j == 0 else None)
    axes[1].hist(f.trace, bins=10, alpha=0.6, color=f"C{i}", label=m)
    at_mean = flatness.hessian_top_eigenvalues(train_loss, posteriors[m].mean, k=10, key=jax.random.PRNGKey(4))
    axes[2].plot(np.arange(1, 11), at_mean, "o-", color=f"C{i}", label=m)
axes[0].set(title="top-5 Hessian eigenvalues at each sample", xlabel="index k", ylabel="λ_k")
axes[1].set(title="Hutchinson tr H at each sample", xlabel="tr H")
axes[2].set(title="top-10 eigenvalues at the posterior mean", xlabel="index k", yscale="log")
for ax in axes:
    ax.legend()
plt.tight_layout(); plt.show()
'''),
    md(r"""
## Loss landscapes around the posterior means

A random direction $d$ is normalised filter by filter to the weights, $d_f\leftarrow d_f\,\|w_f\|/\|d_f\|$ (biases set
to 0), so slices of networks at different scales are comparable (`filter_normalized_direction`);
`loss_landscape_1d` / `_2d` evaluate $\ell(\mu+\alpha d_1+\beta d_2)$ on the full training set. The right-hand 1-D
panel uses the posterior's own spread instead: $d=\sigma\odot\varepsilon$ (`posterior_directions`), so
$\alpha=\pm1$ is one posterior standard deviation along a random draw — the region BMA actually averages over.
`plot_landscape_1d` / `plot_landscape_2d` write the same plots as PNG files for scripts.
"""),
    code(r'''
alphas = np.linspace(-1.0, 1.0, GRID_1D)
std_alphas = np.linspace(-3.0, 3.0, GRID_1D)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for m, q in posteriors.items():
    d = flatness.filter_normalized_direction(jax.random.PRNGKey(5), q.mean)   # same seed for both posteriors
    axes[0].plot(alphas, flatness.loss_landscape_1d(train_loss, q.mean, d, alphas), label=m)
    (d_q,) = flatness.posterior_directions(q, 1, key=jax.random.PRNGKey(6))
    axes[1].plot(std_alphas, flatness.loss_landscape_1d(train_loss, q.mean, d_q, std_alphas), label=m)
axes[0].set(title="filter-normalised direction", xlabel="α", ylabel="training loss", yscale="log")
axes[1].set(title="posterior direction σ⊙ε", xlabel="α (posterior std)", ylabel="training loss", yscale="log")
for ax in axes:
    ax.legend()
plt.tight_layout(); plt.show()
'''),
    code(r'''
grid = np.linspace(-1.0, 1.0, GRID_2D)
surfaces = {}
for m, q in posteriors.items():
    dirs = tuple(flatness.filter_normalized_direction(k, q.mean) for k in jax.random.split(jax.random.PRNGKey(7)))
    surfaces[m] = flatness.loss_landscape_2d(train_loss, q.mean, dirs, grid, grid)
levels = np.linspace(np.log(min(s.min() for s in surfaces.values())), np.log(max(s.max() for s in surfaces.values())), 25)
fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
for ax, (m, surf) in zip(axes, surfaces.items()):
    cs = ax.contourf(grid, grid, np.log(surf).T, levels=levels, cmap="viridis")
    ax.contour(grid, grid, np.log(surf).T, levels=levels, colors="k", linewidths=0.3)
    ax.plot(0, 0, "r*", ms=10)
    ax.set(title=f"{m}: log training loss", xlabel="α (d₁)", ylabel="β (d₂)")
fig.colorbar(cs, ax=axes, label="log loss")
plt.show()
for m, surf in surfaces.items():
    print(f"{m}: loss at the mean {surf[GRID_2D // 2, GRID_2D // 2]:.4f}; mean over the 2-D grid {surf.mean():.4f}; "
          f"fraction of the grid within 2x the centre loss: {np.mean(surf < 2 * surf[GRID_2D // 2, GRID_2D // 2]):.2f}")
'''),
    md(r"""
## Claim 2: BMA over the flattest vs the sharpest half of the samples

The $S$ samples of each posterior are ranked by their sharpness ($\lambda_{\max}$, and separately $\operatorname{tr}H$),
and the BMA predictive is formed from the flatter and from the sharper half alone. If flatness matters for BMA, the
flat half should predict better; the table shows what happened on this run.
"""),
    code(r'''
print("| posterior | ranked by | half | mean λ_max | mean tr H | ACC | NLL | ECE |")
print("|---|---|---|---|---|---|---|---|")
halves = {}
for m, f in flat.items():
    for crit, values in (("λ_max", f.lambda_max), ("tr H", f.trace)):
        order = np.argsort(values)
        for half, idx in (("flat", order[: S // 2]), ("sharp", order[S // 2:])):
            r = bma_metrics(jax.tree.map(lambda x: x[idx], samples[m]))
            halves[m, crit, half] = r
            print(f"| {m} | {crit} | {half} | {f.lambda_max[idx].mean():.3f} | {f.trace[idx].mean():.2f} | "
                  f"{r['acc']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} |")
wins = sum(halves[m, c, "flat"]["nll"] < halves[m, c, "sharp"]["nll"] for m in flat for c in ("λ_max", "tr H"))
print(f"\nThe flat half has the lower test NLL in {wins} of 4 comparisons on this run.")

# Per-sample view: sharpness against the test NLL of each sample on its own.
plt.figure(figsize=(5, 3.4))
for i, (m, f) in enumerate(flat.items()):
    nll_s = [float(metrics.nll(jax.nn.log_softmax(mlp(jax.tree.map(lambda x: x[s], samples[m]), x_te)), y_te))
             for s in range(S)]
    plt.scatter(f.lambda_max, nll_s, s=14, color=f"C{i}", label=m)
plt.xlabel("λ_max at the sample"); plt.ylabel("test NLL of the sample alone"); plt.legend(); plt.tight_layout()
plt.show()
print(f"total wall time {time.perf_counter() - t_start:.0f}s")
'''),
    md(r"""
The tables above are one seed of a small model; with `QUICK` off (more steps, $S=30$ samples, 100 Hutchinson probes)
the estimates are less noisy, but which posterior is flatter, and whether the flat half wins, still depends on the run
— rerun with other seeds or $\rho$ (`RHO`) before drawing conclusions. For the library calls without the plots, see
`fpbma.flatness` (`posterior_flatness`, `hessian_top_eigenvalues`, `hessian_trace`, `loss_landscape_1d/2d`).
"""),
]


NOTEBOOKS = {"02": ("02_transfer_learning.ipynb", TRANSFER), "03": ("03_flatness.ipynb", FLATNESS)}


def build(prefix, cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata = {"accelerator": "TPU",
                   "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, c in enumerate(nb.cells):  # stable ids: regenerating an unchanged notebook gives an identical file
        c["id"] = f"nb{prefix}-{i:02d}"
    return nb


def main(argv):
    if len(argv) == 3 and argv[1] == "--script":
        _, cells = NOTEBOOKS[argv[2]]
        print("\n\n".join(c.source for c in cells if c.cell_type == "code" and "pip" not in c.source))
        return
    for prefix, (name, cells) in NOTEBOOKS.items():
        nb = build(prefix, cells)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main(sys.argv)
