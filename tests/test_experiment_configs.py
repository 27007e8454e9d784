"""Tests of the experiment configs and of the pre-trained source stage (experiments.pipeline).

* every config's ``get_config()`` passes validation, the paper's CIFAR configs up to their missing
  resources, where they stop with one ConfigError naming the checkpoint or dataset and write nothing;
* Fashion-MNIST → MNIST runs end to end on a tiny override; its cached source data equal the loader's;
* EfficientNet-Lite0 behind the pipeline's input path gives the logits of ``from_pretrained`` + the
  model's own ``preprocess`` on real ImageNet photos (foolbox), grey images equal their RGB copies, and a
  tiny source stage (new head) → SWAG prior keeps the backbone exactly the checkpoint's.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fpbma.data
import fpbma.models
from experiments import config_checks, input_pipeline, models, pipeline as stages, training, workdir as layout
from tests.experiment_utils import first_table

CONFIGS = ("default", "tiny", "fashion_to_mnist", "efficientnet_digits", "cifar10_resnet18", "cifar100_vit_b16")


def _config(name, workdir):
    c = importlib.import_module(f"experiments.configs.{name}").get_config()
    c.workdir = str(workdir)
    c.progress = False
    return c


@pytest.mark.parametrize("name", [n for n in CONFIGS if not n.startswith("cifar")])
def test_offline_configs_validate(name, tmp_path):
    stages.validate(_config(name, tmp_path / "wd"), "transfer")
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("name", ["cifar10_resnet18", "cifar100_vit_b16"])
def test_cifar_configs_name_the_missing_resource(name, tmp_path):
    config = _config(name, tmp_path / "wd")
    with pytest.raises(config_checks.ConfigError, match="config.model.pretrained=/path"):
        stages.validate(config, "transfer")
    missing = str(tmp_path / "nowhere" / "weights.safetensors")
    config.model.pretrained = missing
    with pytest.raises(config_checks.ConfigError, match=re.escape(missing)):
        stages.validate(config, "transfer")
    checkpoint = tmp_path / "weights.safetensors"
    checkpoint.write_bytes(b"")  # present: validation moves on to the data
    config.model.pretrained = str(checkpoint)
    config.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(config_checks.ConfigError, match=r"config.data.source='imagenet2012' is not available"):
        stages.validate(config, "transfer")
    assert not (tmp_path / "wd").exists() and not (tmp_path / "tfds").exists()


def test_fashion_to_mnist_end_to_end(tmp_path):
    c = _config("fashion_to_mnist", tmp_path)
    c.methods = ("fpbma", "sgd")
    c.eval.corruptions = "none"
    c.data.k_shot = 2
    c.data.image_size = 12
    c.data.source_size = 300
    c.checkpoint_every = 2
    c.model.width = 4
    c.pretrain.steps, c.pretrain.batch_size = 6, 16
    c.prior.steps, c.prior.batch_size, c.prior.collect_every, c.prior.rank = 4, 16, 2, 2
    c.transfer.steps, c.transfer.batch_size, c.transfer.kl_min_var = 4, 10, 1e-2
    c.eval.num_samples, c.eval.chunk_size, c.eval.batch_size = 2, 2, 256
    results = stages.run_pipeline(c)
    assert set(results) == {"fpbma", "sgd"}
    rows = first_table((tmp_path / "results.md").read_text())
    for row in rows:
        method = row.split("|")[1].strip()
        metrics = json.loads(open(os.path.join(layout.method_dir(c, method, 0), "metrics.json")).read())
        assert float(row.split("|")[2]) == pytest.approx(metrics["in_domain"]["raw"]["acc"], abs=1e-4)
    # The source stage used 300 Fashion-MNIST training images (seeded subset) and the MNIST target.
    src = input_pipeline.source_data(c)
    full = fpbma.data.load("fashion_mnist", "train")
    idx = np.sort(np.random.default_rng(0).permutation(len(full))[:300])
    np.testing.assert_array_equal(src["label"], full.labels[idx])
    assert src["image"].shape == (300, 12, 12, 1)
    assert input_pipeline.target_data(c, 0)["test_label"].shape == (len(fpbma.data.load("mnist", "test")),)


def _imagenet_photos(n=2):
    foolbox = pytest.importorskip("foolbox")
    from PIL import Image

    files = sorted(glob.glob(os.path.join(os.path.dirname(foolbox.__file__), "data", "imagenet_*.jpg")))[:n]
    labels = np.array([int(re.search(r"imagenet_\d+_(\d+)\.jpg$", f).group(1)) for f in files])
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]), labels


def test_pretrained_source_model_matches_from_pretrained(tmp_path):
    images, labels = _imagenet_photos()
    c = _config("efficientnet_digits", tmp_path)
    c.model.image_size = 224  # the checkpoint's own resolution and eval crop
    model, variables = models.build_model(c, 1000, 3)
    ref_model, ref_vars = fpbma.models.from_pretrained("efficientnet_lite0", None)
    ref = ref_model.apply(ref_vars, fpbma.models.preprocess("efficientnet_lite0", images), train=False)
    apply = jax.jit(models.eval_apply(model))
    out = apply(variables, input_pipeline.normalise(images))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.argmax(out, -1), labels)
    # A grey image enters the network as its three-channel copy.
    grey = images[..., :1]
    np.testing.assert_allclose(apply(variables, input_pipeline.normalise(grey)),
                               apply(variables, input_pipeline.normalise(np.repeat(grey, 3, -1))), rtol=1e-5, atol=1e-5)


def test_efficientnet_source_stage_and_prior(tmp_path):
    c = _config("efficientnet_digits", tmp_path)
    c.data.image_size = 16
    c.data.source_size = 64
    c.model.image_size = 32
    c.checkpoint_every = 2
    c.pretrain.steps, c.pretrain.batch_size = 4, 16
    c.prior.steps, c.prior.batch_size, c.prior.collect_every, c.prior.rank = 4, 8, 2, 2
    stages.validate(c, "transfer")
    # The source stage trained the new head only: every other weight and statistic is the checkpoint's.
    _, loaded = fpbma.models.from_pretrained("efficientnet_lite0", None, num_classes=10)
    source = training.pretrain(c)
    flat = jax.tree_util.tree_leaves_with_path
    for (path, a), (_, b) in zip(flat({**source, "params": {k: v for k, v in source["params"].items() if k != "head"}}),
                                 flat({**loaded, "params": {k: v for k, v in loaded["params"].items() if k != "head"}})):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert float(jnp.abs(source["params"]["head"]["kernel"]).max()) > 0  # the zero head was trained
    # The SWAG prior's mean stays near the loaded weights (SGD with a small rate for 4 steps).
    prior = training.fit_prior(c, source)
    stem = prior.mean["stem_conv"]["kernel"]
    assert 0 < float(jnp.abs(stem - loaded["params"]["stem_conv"]["kernel"]).max()) < 0.05
