"""One training machinery for every stage: a method's trainer, jitted once, data-parallel, resumable.

Every stage is a :class:`fpbma.types.Trainer` of the method interface (:mod:`fpbma.methods`) run by
:func:`run_loop`:

* pre-training from scratch — the ``sgd`` method (momentum, weight decay, cosine rate) on the source
  cross-entropy with BatchNorm in train mode; its running statistics travel in the state's ``model_state``;
* a pre-trained backbone's source head — the ``sgd`` method on the head alone, the backbone fixed;
* the SWAG prior — :func:`fpbma.transfer.swag_prior_trainer` (the ``swag`` method collecting from step 0);
* every method's transfer training — :func:`fpbma.transfer.make_trainer`.

:func:`run_loop` jits the trainer's step once with :func:`fpbma.parallel.make_data_parallel_step`: the
state (a :class:`fpbma.types.TrainState`) is replicated over a 1-D ``data`` mesh of every device, each
mini-batch is split over it (:func:`fpbma.parallel.shard_batch`), and the loss, a mean over the global
batch, makes XLA average the gradients, so D devices give the one-device numbers up to float32 reduction
order. Per-step randomness is ``fold_in(key, step)`` and the data order of epoch e is
``np.random.default_rng([seed, e])``, so a run killed at any point and restarted finishes with the same
result as an uninterrupted one. With ``--config.distributed=True`` (after ``jax.distributed.initialize()``)
the mesh spans every host and each host feeds its share of every batch (:func:`host_rows`).

References:
  Lim et al., "Flat Posterior Does Matter For Bayesian Model Averaging", arXiv:2406.15664, §4–5.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any, Callable, Optional

import jax
import numpy as np

from experiments import evaluation
from experiments.config_checks import ConfigError, method_settings, pretrained_of, training_kwargs
from experiments.input_pipeline import batch_indices, host_rows, normalise, source_data, target_data
from experiments.models import build_model, eval_apply
from experiments.progress import progress_bar
from experiments.workdir import checkpoints, method_dir, read_json, stage_dir, write_json
from fpbma import methods, parallel, transfer
from fpbma import posterior as post
from fpbma.models.checkpoints import restore_checkpoint, save_checkpoint
from fpbma.types import Trainer, TrainState


@dataclasses.dataclass(frozen=True)
class LoopResult:
    """What :func:`run_loop` returns.

    Attributes:
      state: the train state after the last step run (replicated over the mesh).
      finished: False when ``config.max_steps`` stopped the run early.
      num_compilations: compiled variants of the step in this call (1 when it ran; 0 when nothing was left).
    """

    state: TrainState
    finished: bool
    num_compilations: int


def restore(path: str, like):
    """:func:`fpbma.models.checkpoints.restore_checkpoint`, with one line naming a damaged or foreign checkpoint."""
    try:
        # host arrays: they go with any device placement (replicated training, sharded BMA)
        return jax.device_get(restore_checkpoint(path, like=like))
    except Exception as e:  # orbax raises many types for a damaged or foreign checkpoint
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ConfigError(f"checkpoint {path} cannot be restored ({type(e).__name__}: {first}); it is damaged or "
                          f"was written by another version: delete it (rm -r '{path}') and run again: that stage "
                          "is rebuilt.") from None


def check_checkpoint(path: str) -> None:
    """A checkpoint restores (one ConfigError line naming it and the fix otherwise)."""
    restore(path, None)


class MetricsLog:
    """Per-step metrics of one stage: TensorBoard event files (tensorboardX) and ``metrics.jsonl``.

    Only process 0 writes (multi-host runs); ``every`` thins the training metrics (the last step is always
    logged); a resumed run appends.
    """

    def __init__(self, directory: str, every: int, learning_rate: Optional[Callable[[int], float]] = None):
        self.every, self.learning_rate = max(int(every), 1), learning_rate
        self.path = os.path.join(directory, "metrics.jsonl")
        self.writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(directory, "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if self.writer is None or not values:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")

    def train(self, step: int, state, last: bool = False) -> None:
        if self.writer is None or (step % self.every and not last):
            return
        values = {f"train/{k}": float(v) for k, v in jax.device_get(state.metrics).items()}
        if self.learning_rate is not None:
            values["train/learning_rate"] = float(self.learning_rate(step - 1))
        self.write(step, values)

    def validation(self, step: int, values: Optional[dict]) -> None:
        self.write(step, {f"validation/{k}": float(v) for k, v in (values or {}).items()})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_metrics(directory: str) -> list[dict]:
    """The lines of a stage's ``metrics.jsonl`` (``[]`` when it has none)."""
    path = os.path.join(directory, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_loop(config, directory: str, trainer: Trainer, data: dict, *, num_steps: int, batch_size: int, seed: int,
             desc: str, on_step: Optional[Callable[[int, TrainState], None]] = None,
             on_step_every: int = 0, stoppable: bool = True,
             learning_rate: Optional[Callable[[int], float]] = None) -> LoopResult:
    """Runs ``trainer.step(state, batch, fold_in(key, t))`` for t = t₀ … num_steps − 1 on every device.

    Resumes from the latest ``step_<t>`` checkpoint in ``directory`` and saves one every
    ``config.checkpoint_every`` steps and at the end (the latest kept). ``on_step(t + 1, state)`` runs after
    every ``on_step_every``-th step and after the last one (checkpoint selection on validation data); it
    may return a dict of validation metrics to log, and may raise to stop the run (a pruned tuning trial).

    Every ``config.log_every`` steps and at the end, the state's metrics (``train/loss``, ``train/kl``,
    ``train/num_skipped``, ``train/learning_rate`` from ``learning_rate(t)``) and the validation metrics
    (``validation/<name>``) go to TensorBoard event files in ``<directory>/tensorboard`` (tensorboardX)
    and, as JSON lines, to ``<directory>/metrics.jsonl``.

    Args:
      config: the experiment config (``checkpoint_every``, ``max_steps``, ``progress``).
      directory: the stage's directory.
      trainer: the stage's :class:`fpbma.types.Trainer`.
      data: arrays sharing a leading axis of N examples (the whole training set, on the host).
      num_steps: K.
      batch_size: B (``min(B, N)`` is used); it must split over the devices.
      seed: the seed of the batch order and of the step keys.
      desc: the progress bar's label.
      learning_rate: ``t -> η_t`` of the stage's optimizer, logged with the metrics (None: not logged).
      stoppable: whether ``config.max_steps`` (≥ 0) stops the run after that many steps (the prior fit,
        short and never checkpointed mid-way before, always runs to the end).

    Returns:
      A :class:`LoopResult`; ``loop.json`` in ``directory`` records the steps run, the device count and the
      number of compilations of the step.
    """
    os.makedirs(directory, exist_ok=True)
    mesh = parallel.data_mesh()
    init = trainer.init()
    done = checkpoints(directory)
    state, start = init, 0
    if done:
        start = done[-1]
        state = restore(os.path.join(directory, f"step_{start}"), init)
    step = parallel.make_data_parallel_step(trainer.step, mesh)
    state = parallel.replicate(state, mesh)
    key = jax.random.PRNGKey(seed)
    n = next(iter(data.values())).shape[0]
    batch_size = min(batch_size, n)
    every = int(config.checkpoint_every)
    log = MetricsLog(directory, int(config.get("log_every", 1)), learning_rate)

    def result(t, finished):
        log.close()
        out = LoopResult(state, finished, step.num_compilations())
        if jax.process_index() == 0:
            write_json(os.path.join(directory, "loop.json"),
                       {"start_step": start, "end_step": t, "devices": mesh.devices.size,
                        "batch_size": batch_size, "num_compilations": out.num_compilations})
        return out

    with progress_bar(config, num_steps, desc, initial=start) as tick:
        for t in range(start, num_steps):
            if stoppable and config.max_steps >= 0 and t >= config.max_steps:
                return result(t, False)
            idx = batch_indices(n, batch_size, seed, t)
            batch = parallel.shard_batch(host_rows({k: v[idx] for k, v in data.items()}), mesh)
            state = step(state, batch, jax.random.fold_in(key, t))
            log.train(t + 1, state, last=t + 1 == num_steps)
            if (t + 1) % every == 0 or t + 1 == num_steps:
                # host arrays: a checkpoint restores on any device count
                save_checkpoint(os.path.join(directory, f"step_{t + 1}"), jax.device_get(state), overwrite=True)
                for old in checkpoints(directory)[:-1]:
                    shutil.rmtree(os.path.join(directory, f"step_{old}"), ignore_errors=True)
            if on_step is not None and ((on_step_every > 0 and (t + 1) % on_step_every == 0) or t + 1 == num_steps):
                log.validation(t + 1, on_step(t + 1, state))
            tick()
    return result(num_steps, True)


# ----------------------------------------------------------------------------------------------
# Stage 1: the source network.


def _training_arrays(data: dict) -> dict:
    """The source split as the training loop takes it: normalised images and labels."""
    return {"image": normalise(data["image"]), "label": data["label"]}


def source_model(config, data: Optional[dict] = None):
    """``(model, initial variables)`` of the source network (source classes, source channels).

    ``data``: the source arrays when the caller has them already (:func:`source_data` otherwise)."""
    data = source_data(config) if data is None else data
    return build_model(config, int(data["label"].max()) + 1, data["image"].shape[-1])


def _sgd_trainer(problem, c) -> Trainer:
    """``config.pretrain``'s optimizer: the ``sgd`` method with momentum, weight decay and a cosine rate."""
    return methods.get("sgd").trainer(problem, learning_rate=float(c.learning_rate), num_steps=int(c.steps),
                                      schedule="cosine", warmup_steps=0, momentum=float(c.momentum),
                                      weight_decay=float(c.weight_decay))


def pretrain_trainer(config, model, variables, num_data: int) -> Trainer:
    """Pre-training from scratch: cross-entropy with BatchNorm in train mode, its statistics in ``model_state``."""
    model_state = {k: v for k, v in variables.items() if k != "params"}

    def loss(w, batch, key, state):
        del key
        logits, updates = model.apply({"params": w, **state}, batch["image"], train=True, mutable=list(state))
        return transfer.cross_entropy(logits, batch["label"]), dict(updates)

    problem = methods.plain_problem(loss, variables["params"], num_data, model_state=model_state)
    return _sgd_trainer(problem, config.pretrain)


def source_head_trainer(config, model, variables, num_data: int) -> Trainer:
    """A pre-trained backbone's source stage: only the ``head`` trained, every other weight and the
    checkpoint's BatchNorm running statistics fixed (eval mode, no dropout).

    ``from_pretrained`` gives a zero head when the source classes differ from the checkpoint's; the SWAG
    prior then needs a head that fits the source task. A checkpoint head of the source's size is
    fine-tuned the same way.
    """
    extra = {k: v for k, v in variables.items() if k != "params"}
    body = {k: v for k, v in variables["params"].items() if k != transfer.HEAD}
    head = {transfer.HEAD: variables["params"][transfer.HEAD]}

    def loss(h, batch, key):
        del key
        logits = model.apply({**extra, "params": {**body, **h}}, batch["image"], train=False)
        return transfer.cross_entropy(logits, batch["label"])

    return _sgd_trainer(methods.plain_problem(loss, head, num_data), config.pretrain)


def pretrain(config) -> dict:
    """Trains the source network (or, for a pre-trained backbone, its source head); returns its variables."""
    directory = stage_dir(config, "source")
    final = os.path.join(directory, "final")
    source = source_data(config)
    model, variables = source_model(config, source)
    if os.path.isdir(final):
        return restore(final, variables)
    data = _training_arrays(source)
    n = data["label"].shape[0]
    head_only = bool(pretrained_of(config))
    trainer = (source_head_trainer if head_only else pretrain_trainer)(config, model, variables, n)
    c = config.pretrain
    result = run_loop(config, directory, trainer, data, num_steps=int(c.steps), batch_size=int(c.batch_size),
                      seed=int(config.seed), desc="train source head" if head_only else "pre-train source",
                      learning_rate=methods.learning_rate_schedule(float(c.learning_rate), int(c.steps), "cosine"))
    state = jax.device_get(result.state)
    if head_only:
        out = {**variables, "params": {**variables["params"], **state.params}}
    else:
        out = {"params": state.params, **state.model_state}
    if result.finished:
        save_checkpoint(final, out, overwrite=True)
    return out


def source_finished(config) -> bool:
    return os.path.isdir(os.path.join(stage_dir(config, "source"), "final"))


# ----------------------------------------------------------------------------------------------
# Stage 2: the SWAG prior.


def prior_like(config, variables) -> post.LowRankGaussian:
    """A tree shaped like the prior (for restoring it)."""
    body = {k: v for k, v in variables["params"].items() if k != transfer.HEAD}
    rank = int(config.prior.rank)
    return post.LowRankGaussian(body, body, jax.tree.map(lambda x: np.zeros((rank,) + x.shape, x.dtype), body))


def prior_trainer(config, model, source_variables) -> Trainer:
    """The SWAG prior fit: SGD from the source weights on the source loss, collecting every c steps.

    From scratch, SWAG follows the source training: BatchNorm in train mode (batch statistics), the running
    statistics not updated; the source ones are kept for the target. A pre-trained backbone keeps its
    checkpoint's running statistics (eval mode, no dropout), as in the target stage: SWAG moves the weights
    around the loaded ones, while batch statistics of small source batches would not describe the
    checkpoint's network.
    """
    extra = {k: v for k, v in source_variables.items() if k != "params"}
    if pretrained_of(config):
        def loss(p, batch):
            return transfer.cross_entropy(model.apply({**extra, "params": p}, batch["image"], train=False),
                                          batch["label"])
    else:
        def loss(p, batch):
            logits, _ = model.apply({"params": p, **extra}, batch["image"], train=True, mutable=list(extra))
            return transfer.cross_entropy(logits, batch["label"])
    c = config.prior
    return transfer.swag_prior_trainer(loss, source_variables["params"], num_steps=int(c.steps),
                                       learning_rate=float(c.learning_rate), rank=int(c.rank),
                                       collect_every=int(c.collect_every), min_var=float(c.min_var))


def fit_prior(config, source_variables=None):
    """The SWAG prior over the non-head weights, fitted along SGD on the source data (cached)."""
    directory = stage_dir(config, "prior")
    final = os.path.join(directory, "final")
    source = source_data(config)
    model, variables = source_model(config, source)
    if os.path.isdir(final):
        return restore(final, prior_like(config, variables))
    if source_variables is None:
        source_variables = restore(os.path.join(stage_dir(config, "source"), "final"), variables)
    data = _training_arrays(source)
    trainer = prior_trainer(config, model, source_variables)
    result = run_loop(config, directory, trainer, data, num_steps=int(config.prior.steps),
                      batch_size=int(config.prior.batch_size), seed=int(config.seed) + 1, desc="SWAG prior",
                      stoppable=False, learning_rate=lambda t: float(config.prior.learning_rate))
    prior = trainer.finalize(jax.device_get(result.state))
    save_checkpoint(final, prior, overwrite=True)
    return prior


# ----------------------------------------------------------------------------------------------
# Stage 3: one method on the target.


@dataclasses.dataclass(frozen=True)
class TransferRun:
    """Everything one transfer seed's methods train and evaluate on.

    Attributes:
      seed: the transfer seed (few-shot draw, training noise, BMA samples).
      data: :func:`experiments.input_pipeline.target_data` of the seed.
      model: the target network (the source architecture with a new head).
      extra: the source's non-trained variables (BatchNorm statistics), ``{}`` if none.
      scheme: the :class:`fpbma.transfer.TransferScheme` of the prior.
    """

    seed: int
    data: dict
    model: Any
    extra: dict
    scheme: transfer.TransferScheme

    def sampler(self, config, posterior):
        """``key -> variables`` of the BMA: w_S from ``posterior``, the frozen rest from the prior."""
        return transfer.sample_weights(self.scheme, posterior, self.extra, bool(config.transfer.sample_frozen))


def setup_transfer(config, seed: int, prior=None, source_variables=None) -> TransferRun:
    """The :class:`TransferRun` of ``seed``: target data, model, source statistics and the scheme."""
    data = target_data(config, seed)
    num_classes = int(max(data["train_label"].max(), data["test_label"].max())) + 1
    model, variables = build_model(config, num_classes, data["train_image"].shape[-1])
    if source_variables is None:
        source_variables = restore(os.path.join(stage_dir(config, "source"), "final"), source_model(config)[1])
    if prior is None:
        prior = fit_prior(config, source_variables)
    scheme = transfer.make_scheme(prior, variables["params"], config.transfer.scheme, config.transfer.alpha,
                                  kl_min_var=config.transfer.kl_min_var)
    extra = {k: v for k, v in source_variables.items() if k != "params"}
    return TransferRun(int(seed), data, model, extra, scheme)


def make_method_trainer(config, method: str, run: TransferRun) -> Trainer:
    """``method``'s trainer on the run's scheme with its resolved hyperparameters."""
    apply, model, extra = eval_apply(run.model), run.model, run.extra
    x, y = normalise(run.data["train_image"]), run.data["train_label"]
    hp, shared = method_settings(config, method)
    return transfer.make_trainer(
        method, run.scheme, lambda p, im: apply({**extra, "params": p}, im), num_data=x.shape[0],
        sample_frozen_weights=bool(config.transfer.sample_frozen),
        features_fn=lambda p, im: transfer.head_features(model, {**extra, "params": p}, im),
        train_data=(x, y), hyperparameters=hp, **training_kwargs(shared))


def method_learning_rate(config, method: str) -> Optional[Callable[[int], float]]:
    """``t -> η_t`` of a method with a learning-rate schedule (constant or cosine after warm-up), else None
    (SGLD and E-MCMC follow their own cyclical step size)."""
    _, shared = method_settings(config, method)
    if "schedule" not in shared:
        return None
    rate = methods.learning_rate_schedule(float(shared["learning_rate"]), int(shared["steps"]),
                                          shared["schedule"], int(shared["warmup_steps"]))
    return rate if callable(rate) else (lambda t: rate)


@dataclasses.dataclass(frozen=True)
class TrainedMethod:
    """A method trained on one seed: its result (a posterior, samples, ...), final state, and how it ran.

    Attributes:
      posterior: ``trainer.finalize(state)``; None when the run stopped early.
      state: the selected train state (host arrays).
      finished: False when ``config.max_steps`` stopped the run early.
      num_compilations: compiled variants of the train step in this call (0 when restored from ``final``).
    """

    posterior: Any
    state: TrainState
    finished: bool
    num_compilations: int = 0


def train_method(config, method: str, seed: int, run: Optional[TransferRun] = None,
                 report: Optional[Callable[[int, float], None]] = None) -> TrainedMethod:
    """Trains ``method`` on the few-shot target of ``seed`` (resumable).

    With ``config.transfer.select = "val_nll"`` (the paper's protocol) the validation NLL of the BMA with
    ``config.transfer.select_samples`` weights is computed every ``config.transfer.select_every`` steps and
    at the end, and the returned state is the one where it was lowest (``selection.json`` in the method's
    directory keeps the curve and the chosen step); ``"last"`` returns the final step.
    ``report(step, nll)`` is called with every validation NLL (a tuner's pruning hook).
    """
    run = run or setup_transfer(config, seed)
    trainer = make_method_trainer(config, method, run)
    directory = method_dir(config, method, seed)
    final = os.path.join(directory, "final")
    init = trainer.init()
    if os.path.isdir(final):
        state = restore(final, init)
        return TrainedMethod(trainer.finalize(state), state, True)
    on_step, every = None, 0
    record_path = os.path.join(directory, "selection.json")
    record = read_json(record_path, {"curve": [], "step": None, "val_nll": None})
    if config.transfer.get("select", "last") == "val_nll":
        every = int(config.transfer.select_every)
        samples = int(config.transfer.select_samples)

        def on_step(step, state):
            nll = evaluation.validation_nll(config, trainer, state, run, samples)
            record["curve"].append([int(step), nll if math.isfinite(nll) else None])
            if math.isfinite(nll) and (record["val_nll"] is None or nll < record["val_nll"]):
                save_checkpoint(os.path.join(directory, "best"), jax.device_get(state), overwrite=True)
                record.update(step=int(step), val_nll=nll)
            if jax.process_index() == 0:
                write_json(record_path, record)
            if report is not None:
                report(int(step), nll)
            return {"nll": nll} if math.isfinite(nll) else {}

    os.makedirs(directory, exist_ok=True)
    batch = {"image": normalise(run.data["train_image"]), "label": run.data["train_label"]}
    result = run_loop(config, directory, trainer, batch, num_steps=int(method_settings(config, method)[1]["steps"]),
                      batch_size=int(config.transfer.batch_size), seed=1000 * seed + 17,
                      desc=f"train {method} (seed {seed})", on_step=on_step, on_step_every=every,
                      learning_rate=method_learning_rate(config, method))
    state = jax.device_get(result.state)
    if not result.finished:
        return TrainedMethod(None, state, False, result.num_compilations)
    if record["step"] is not None and record["step"] != int(state.step):
        state = restore(os.path.join(directory, "best"), init)
    save_checkpoint(final, state, overwrite=True)
    return TrainedMethod(trainer.finalize(state), state, True, result.num_compilations)
