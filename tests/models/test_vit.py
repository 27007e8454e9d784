"""Flax ViT against the independent torch reference (timm key names), through safetensors and npz.

A tiny configuration (32 px, patch 8, width 64, 2 blocks, 4 heads) keeps the test fast while
exercising every layer type; the same code builds ViT-Ti/S/B.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import fpbma.models as M
from fpbma.models import partition
from tests.models import torch_reference as ref

TOL = 1e-4
CFG = dict(patch_size=8, hidden_dim=64, depth=2, num_heads=4, mlp_dim=128)


def _torch_vit(seed, img=32, num_classes=10):
    net = ref.VisionTransformer(img, CFG["patch_size"], CFG["hidden_dim"], CFG["depth"],
                                CFG["num_heads"], CFG["mlp_dim"], num_classes)
    return ref.randomize_(net, seed).eval()


def _flax_vit(num_classes=10, img=32):
    return M.ViT(num_classes=num_classes, image_size=img, **CFG)


def _logits(net, x):
    with torch.no_grad():
        return net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()


def _images(seed, n=2, size=32):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _to_big_vision(net, combined_posemb=True):
    """The torch model's weights in the Google ViT / big_vision .npz naming and layout."""
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    d, h = CFG["hidden_dim"], CFG["num_heads"]
    out = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": sd["patch_embed.proj.bias"],
           "Transformer/encoder_norm/scale": sd["norm.weight"],
           "Transformer/encoder_norm/bias": sd["norm.bias"],
           "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    if combined_posemb:  # ViT paper layout: posemb for [cls] + patches, cls added before it.
        out["cls"] = sd["cls_token"]
        out["Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    else:  # newer big_vision layout: posemb for patches only, [cls] carries its own offset.
        out["cls"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        out["pos_embedding"] = sd["pos_embed"][:, 1:]
    for i in range(CFG["depth"]):
        t, b = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        out[b + "LayerNorm_0/scale"], out[b + "LayerNorm_0/bias"] = sd[t + "norm1.weight"], sd[
            t + "norm1.bias"]
        out[b + "LayerNorm_2/scale"], out[b + "LayerNorm_2/bias"] = sd[t + "norm2.weight"], sd[
            t + "norm2.bias"]
        w, bias = sd[t + "attn.qkv.weight"], sd[t + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            out[b + f"MultiHeadDotProductAttention_1/{name}/kernel"] = \
                w[j * d:(j + 1) * d].T.reshape(d, h, d // h)
            out[b + f"MultiHeadDotProductAttention_1/{name}/bias"] = \
                bias[j * d:(j + 1) * d].reshape(h, d // h)
        out[b + "MultiHeadDotProductAttention_1/out/kernel"] = \
            sd[t + "attn.proj.weight"].T.reshape(h, d // h, d)
        out[b + "MultiHeadDotProductAttention_1/out/bias"] = sd[t + "attn.proj.bias"]
        out[b + "MlpBlock_3/Dense_0/kernel"] = sd[t + "mlp.fc1.weight"].T
        out[b + "MlpBlock_3/Dense_0/bias"] = sd[t + "mlp.fc1.bias"]
        out[b + "MlpBlock_3/Dense_1/kernel"] = sd[t + "mlp.fc2.weight"].T
        out[b + "MlpBlock_3/Dense_1/bias"] = sd[t + "mlp.fc2.bias"]
    return out


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    net = _torch_vit(seed=0)
    path = tmp_path_factory.mktemp("vit") / "vit.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, str(path))
    return net, path


def test_timm_safetensors_logits_match_torch_and_jit(timm_file):
    net, path = timm_file
    model, variables = M.load_pretrained(_flax_vit(), path)
    x = _images(1)
    theirs = _logits(net, x)
    ours = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x)))
    assert np.abs(theirs).max() > 0.1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)


@pytest.mark.parametrize("combined_posemb", [True, False])
def test_big_vision_npz_logits_match_torch(combined_posemb, tmp_path):
    net = _torch_vit(seed=2)
    path = tmp_path / "vit.npz"
    np.savez(path, **_to_big_vision(net, combined_posemb))
    model, variables = M.load_pretrained(_flax_vit(), path)
    x = _images(3)
    np.testing.assert_allclose(np.asarray(model.apply(variables, jnp.asarray(x))),
                               _logits(net, x), rtol=0, atol=TOL)


@pytest.mark.parametrize("new_img", [48, 16])
def test_pos_embed_interpolation_matches_torch_bilinear(timm_file, new_img):
    net, path = timm_file
    model, variables = M.load_pretrained(_flax_vit(), path, image_size=new_img)
    g_new = new_img // CFG["patch_size"]
    assert variables["params"]["pos_embed"].shape == (1, 1 + g_new * g_new, CFG["hidden_dim"])
    # torch side: resize the patch grid of pos_embed with F.interpolate, keep the cls entry.
    big = _torch_vit(seed=0, img=new_img)
    big.load_state_dict({k: v for k, v in net.state_dict().items() if k != "pos_embed"},
                        strict=False)
    pe = net.pos_embed.detach()
    g = int((pe.shape[1] - 1) ** 0.5)
    grid = pe[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bilinear", align_corners=False)
    with torch.no_grad():
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pe.shape[2])
        big.pos_embed.copy_(torch.cat([pe[:, :1], grid], 1))
    x = _images(4, size=new_img)
    np.testing.assert_allclose(np.asarray(model.apply(variables, jnp.asarray(x))),
                               _logits(big, x), rtol=0, atol=TOL)
    # the model built at 32 px resamples on the fly for a 48/16 px input, to the same logits.
    model32, variables32 = M.load_pretrained(_flax_vit(), path)
    np.testing.assert_allclose(np.asarray(model32.apply(variables32, jnp.asarray(x))),
                               _logits(big, x), rtol=0, atol=TOL)


def test_vit_head_replacement_and_mismatch_errors(timm_file, tmp_path):
    net, path = timm_file
    _, full = M.load_pretrained(_flax_vit(), path)
    model, new = M.load_pretrained(_flax_vit(), path, num_classes=3)
    assert new["params"]["head"]["kernel"].shape == (64, 3)
    assert float(jnp.abs(new["params"]["head"]["kernel"]).max()) == 0.0
    for k in full["params"]:
        if k != "head":
            jax.tree_util.tree_map(np.testing.assert_array_equal, full["params"][k],
                                   new["params"][k])
    bv = _to_big_vision(net)
    del bv["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/kernel"]
    bv["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] = np.zeros((64, 7), np.float32)
    np.savez(tmp_path / "bad.npz", **bv)
    with pytest.raises(M.CheckpointMismatchError) as err:
        M.load_pretrained(_flax_vit(), tmp_path / "bad.npz")
    msg = str(err.value)
    for name in ("blocks_1/attn/qkv/kernel",  # missing: one of q/k/v absent
                 "encoderblock_1/MultiHeadDotProductAttention_1/query/kernel",  # left unused
                 "encoderblock_0/MlpBlock_3/Dense_0/kernel"):  # wrong shape
        assert name in msg, (name, msg)


def test_named_vit_configs_match_torch_parameter_counts():
    for name, (d, depth, heads, mlp) in {"vit_ti16": (192, 12, 3, 768),
                                         "vit_b16": (768, 12, 12, 3072)}.items():
        net = ref.VisionTransformer(224, 16, d, depth, heads, mlp, 1000)
        model = M.spec(name).build(1000, 224)
        x = jnp.zeros((1, 224, 224, 3))
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
        assert partition.count(shapes["params"]) == sum(p.numel() for p in net.parameters())
        norms = sum(p.numel() for n, p in net.named_parameters() if "norm" in n)
        subset, _ = partition.split(shapes["params"], "nl_ll")
        assert partition.count(subset) == norms + net.head.weight.numel() + net.head.bias.numel()
