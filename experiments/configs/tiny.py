r"""A tiny config for tests and smoke runs: a few steps, few samples, two methods, three corruptions.

    python -m experiments.transfer --config=experiments/configs/tiny.py --config.workdir=/tmp/fpbma_tiny
"""

from experiments.configs import base


def get_config():
    c = base.get_config()
    c.workdir = "/tmp/fpbma_tiny"
    c.methods = ("fpbma", "sgd")
    c.progress = False
    c.checkpoint_every = 2
    c.model.width = 4
    c.pretrain.steps = 6
    c.pretrain.batch_size = 16
    c.prior.steps = 4
    c.prior.batch_size = 16
    c.prior.collect_every = 2
    c.prior.rank = 2
    c.transfer.kl_min_var = 1e-2  # lr·β·2/(v_min·N) must stay below ~4 for N = 20 few-shot examples
    c.data.k_shot = 2
    c.data.image_size = 12
    c.transfer.steps = 6
    c.transfer.batch_size = 10
    c.eval.num_samples = 2
    c.eval.chunk_size = 2
    c.eval.batch_size = 128
    c.eval.corruptions = "gaussian_noise,contrast,fog"
    c.eval.severities = (1, 5)
    c.eval.corruption_per_class = 1
    c.eval.corruption_num_samples = 2
    return c
