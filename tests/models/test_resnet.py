"""Flax ResNets against the independent torch reference (tests/models/torch_reference.py).

Weights and BatchNorm statistics are random, pass through the real file formats (safetensors
written by ``safetensors.torch``, zip ``.pth`` written by ``torch.save``) and are read back
torch-free; logits must agree to 1e-4 in float32.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import torch
from safetensors.torch import save_file

import fpbma.models as M
from fpbma.models import partition
from tests.models import torch_reference as ref

TOL = 1e-4


def _images(seed, n=2, size=32):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _torch_logits(net, x_nhwc, train=False):
    net.train(train)
    with torch.no_grad():
        return net(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


def _save_safetensors(net, path):
    save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    net = ref.randomize_(ref.resnet18(num_classes=10), seed=0)
    path = _save_safetensors(net, tmp_path_factory.mktemp("r18") / "resnet18.safetensors")
    return net, path


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_eval_logits_match_torch_through_safetensors(arch, tmp_path):
    net = ref.randomize_(getattr(ref, arch)(num_classes=10), seed=1)
    path = _save_safetensors(net, tmp_path / f"{arch}.safetensors")
    model, variables = M.from_pretrained(arch, path)
    x = _images(2)
    ours = np.asarray(model.apply(variables, jnp.asarray(x), train=False))
    theirs = _torch_logits(net, x)
    assert ours.shape == (2, 10)
    assert np.abs(theirs).max() > 0.1  # the comparison is not between two near-zero vectors
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)


def test_eval_logits_match_torch_through_zip_pth(tmp_path):
    pytest.importorskip("fpbma.models.torch_pickle")
    net = ref.randomize_(ref.resnet18(num_classes=10), seed=3)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)  # zip format, torch's default since 1.6
    model, variables = M.from_pretrained("resnet18", path)
    x = _images(4)
    np.testing.assert_allclose(np.asarray(model.apply(variables, jnp.asarray(x))),
                               _torch_logits(net, x), rtol=0, atol=TOL)


def test_train_mode_uses_batch_stats_and_updates_running_stats_like_torch(resnet18_file):
    net, path = resnet18_file
    net = ref.randomize_(ref.resnet18(num_classes=10), seed=0)  # fresh copy: train() mutates it
    model, variables = M.from_pretrained("resnet18", path)
    x = _images(5, n=4, size=64)
    ours, updates = model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    theirs = _torch_logits(net, x, train=True)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=TOL)
    # Running statistics after one torch train step (momentum 0.1, unbiased variance).
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    new = updates["batch_stats"]
    np.testing.assert_allclose(np.asarray(new["bn1"]["mean"]), sd["bn1.running_mean"], atol=1e-5)
    np.testing.assert_allclose(np.asarray(new["bn1"]["var"]), sd["bn1.running_var"],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new["layer4_1"]["bn2"]["var"]),
                               sd["layer4.1.bn2.running_var"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new["layer3_0"]["downsample_bn"]["mean"]),
                               sd["layer3.0.downsample.1.running_mean"], rtol=1e-4, atol=1e-5)
    # Eval mode ignores the batch: a single image gives the same logits alone or in a batch.
    alone = model.apply(variables, jnp.asarray(x[:1]), train=False)
    batched = model.apply(variables, jnp.asarray(x), train=False)[:1]
    np.testing.assert_allclose(np.asarray(alone), np.asarray(batched), rtol=0, atol=1e-5)


def test_forward_jit_compiles_and_matches_eager(resnet18_file):
    _, path = resnet18_file
    model, variables = M.from_pretrained("resnet18", path)
    x = jnp.asarray(_images(6))
    fn = jax.jit(model.apply, static_argnames="train")
    np.testing.assert_allclose(np.asarray(fn(variables, x, train=False)),
                               np.asarray(model.apply(variables, x, train=False)), atol=1e-5)


def test_head_replacement_loads_everything_but_the_head(resnet18_file):
    net, path = resnet18_file
    _, full = M.from_pretrained("resnet18", path)
    model, replaced = M.from_pretrained("resnet18", path, num_classes=7)
    assert model.num_classes == 7
    head = replaced["params"]["head"]
    assert head["kernel"].shape == (512, 7) and head["bias"].shape == (7,)
    assert float(jnp.abs(head["kernel"]).max()) == 0.0 and float(jnp.abs(head["bias"]).max()) == 0.0
    body_full = {c: {k: v for k, v in full[c].items() if k != "head"} for c in full}
    body_new = {c: {k: v for k, v in replaced[c].items() if k != "head"} for c in replaced}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), body_full, body_new)
    # and the body really is the torch checkpoint's: conv1 is torch's weight re-laid out.
    np.testing.assert_array_equal(
        np.asarray(body_new["params"]["conv1"]["kernel"]),
        net.state_dict()["conv1.weight"].numpy().transpose(2, 3, 1, 0))


def test_mismatched_checkpoint_names_every_bad_key(tmp_path):
    net = ref.resnet18(num_classes=10)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    del sd["layer1.0.conv1.weight"]
    del sd["layer4.1.bn2.running_var"]
    sd["layer9.0.conv1.weight"] = torch.zeros(4, 4, 3, 3)
    sd["extra_thing"] = torch.zeros(3)
    sd["layer2.0.bn1.weight"] = torch.ones(3)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(M.CheckpointMismatchError) as err:
        M.from_pretrained("resnet18", tmp_path / "bad.safetensors")
    msg = str(err.value)
    for name in ("layer1_0/conv1/kernel", "layer4_1/bn2/var", "layer9.0.conv1.weight",
                 "extra_thing", "layer2.0.bn1.weight"):
        assert name in msg, (name, msg)
    assert "missing in checkpoint (2)" in msg
    assert "unexpected in checkpoint (2)" in msg
    assert "shape mismatch (1)" in msg


def test_small_stem_checkpoint_into_imagenet_stem_is_a_shape_error(tmp_path):
    net = ref.resnet18(num_classes=10)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)  # a 3x3 small-stem kernel
    save_file(sd, str(tmp_path / "small.safetensors"))
    with pytest.raises(M.CheckpointMismatchError,
                       match=r"conv1\.weight -> params/conv1/kernel: checkpoint \(3, 3, 3, 64\) "
                             r"vs model \(7, 7, 3, 64\)"):
        M.from_pretrained("resnet18", tmp_path / "small.safetensors")


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_parameter_counts_and_nl_ll_subset_match_torch(arch):
    net = getattr(ref, arch)(num_classes=1000)
    model = M.spec(arch).build(1000, 224)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    assert partition.count(shapes["params"]) == sum(p.numel() for p in net.parameters())
    bn = sum(p.numel() for n, p in net.named_parameters()
             if isinstance(net.get_submodule(n.rsplit(".", 1)[0]), torch.nn.BatchNorm2d))
    head = net.fc.weight.numel() + net.fc.bias.numel()
    subset, rest = partition.split(shapes["params"], "nl_ll")
    assert partition.count(subset) == bn + head
    assert partition.count(rest) == sum(p.numel() for p in net.parameters()) - bn - head
    stats = sum(b.numel() for n, b in net.named_buffers() if n.endswith(("mean", "var")))
    assert partition.count(shapes["batch_stats"]) == stats


def test_small_stem_and_resnet20_shapes_and_downsampling():
    x = jnp.zeros((2, 32, 32, 3))
    for name, feat in (("resnet18_small", 512), ("resnet20", 64)):
        model = M.spec(name).build(10, 32)
        variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(1), x))
        assert variables["params"]["head"]["kernel"].shape == (feat, 10)
        # no max-pool and a stride-1 3x3 stem: the first stage sees the full 32x32 grid.
        out, inter = jax.eval_shape(lambda v: model.apply(
            v, x, capture_intermediates=True, mutable=["intermediates"]), variables)
        assert out.shape == (2, 10)
        assert inter["intermediates"]["layer1_0"]["__call__"][0].shape[1:3] == (32, 32)
        assert inter["intermediates"]["layer3_0"]["__call__"][0].shape[1:3] == (8, 8)
    # ResNet-20: 3 stages x 3 BasicBlocks x 2 convs + stem + head = 20 weight layers.
    kernels = [p for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
               if p[-1].key == "kernel" and "downsample" not in jax.tree_util.keystr(p)]
    assert len(kernels) == 20
    # create() gives a working randomly initialised model end to end.
    model, variables = M.create("resnet20", 10, key=jax.random.PRNGKey(2))
    logits = jax.jit(model.apply)(variables, jnp.ones((2, 32, 32, 3)))
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_batchnorm_across_devices_equals_one_big_batch():
    # Batch statistics averaged over a named axis (pmap/shard_map) equal those of the whole batch.
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 3, 3, 5)) * 2.0 + 1.0
    bn = M.BatchNorm(axis_name="devices")
    v = M.BatchNorm().init(jax.random.PRNGKey(0), x[0], train=False)
    y, upd = jax.vmap(lambda xi: bn.apply(v, xi, train=True, mutable=["batch_stats"]),
                      axis_name="devices")(x)
    whole = x.reshape(8, 3, 3, 5)
    y_ref, upd_ref = M.BatchNorm().apply(v, whole, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y).reshape(whole.shape), np.asarray(y_ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["var"][0]),
                               np.asarray(upd_ref["batch_stats"]["var"]), atol=1e-5)
    # and the single-batch update is torch's: 0.9 * 1 + 0.1 * unbiased variance.
    unbiased = np.var(np.asarray(whole).reshape(-1, 5), axis=0, ddof=1)
    np.testing.assert_allclose(np.asarray(upd_ref["batch_stats"]["var"]), 0.9 + 0.1 * unbiased,
                               rtol=1e-5)


def test_loading_does_not_import_torch(resnet18_file, tmp_path):
    net, path = resnet18_file
    pth = tmp_path / "r18.pth"
    torch.save(net.state_dict(), pth)
    code = textwrap.dedent(f"""
        import sys, importlib.util
        import fpbma.models as M
        M.from_pretrained("resnet18", {str(path)!r})
        if importlib.util.find_spec("fpbma.models.torch_pickle"):
            M.from_pretrained("resnet18", {str(pth)!r})
        assert "torch" not in sys.modules, "loading imported torch"
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=str(pathlib.Path(M.__file__).parents[2]))
    assert result.returncode == 0, result.stderr[-2000:]
