"""The batching iterator: exact coverage in evaluation, shuffling, augmentation, device layouts."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fpbma.data


def _flatten(batch):
    return {k: np.asarray(v).reshape((-1,) + np.asarray(v).shape[2:]) for k, v in batch.items()}


def _assert_covers_exactly_once(src, batch_iter, n_devices):
    images, labels, index, sizes = [], [], [], []
    for batch in batch_iter:
        assert batch["image"].shape[0] == n_devices  # leading device axis
        flat = _flatten(batch)
        sizes.append(flat["mask"].shape[0])
        images.append(flat["image"][flat["mask"]])
        labels.append(flat["label"][flat["mask"]])
        index.append(flat["index"][flat["mask"]])
    index = np.concatenate(index)
    np.testing.assert_array_equal(index, np.arange(len(src)))  # every example once, in order
    expected = np.stack([src[i]["image"] for i in range(len(src))]).astype(np.float32) / 255.0
    np.testing.assert_allclose(np.concatenate(images), expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.concatenate(labels), src.labels)
    return sizes


@pytest.mark.parametrize("batch_size", [71, 64, 1000])  # 355 = 5 · 71; 64 and 1000 leave a remainder
def test_evaluation_covers_every_example_once_one_device(data_dir, batch_size):
    src = fpbma.data.load("digits", "test", data_dir=data_dir)
    sizes = _assert_covers_exactly_once(
        src, fpbma.data.batches(src, batch_size, train=False, num_devices=1), n_devices=1)
    assert len(sizes) == fpbma.data.num_batches(355, batch_size, train=False) == -(-355 // batch_size)
    assert set(sizes) == {batch_size}  # the last batch is padded, never short


def test_evaluation_and_training_with_8_cpu_devices(data_dir, tmp_path):
    fpbma.data.load("mnist", "test", data_dir=data_dir)  # build here; the subprocess only reads
    out = tmp_path / "batches.npz"
    code = textwrap.dedent(f"""
        import json, numpy as np, jax
        import fpbma.data
        assert jax.local_device_count() == 8, jax.devices()
        src = fpbma.data.load("mnist", "test", data_dir={data_dir!r})
        arrays, info = {{}}, {{}}
        for layout in ("stack", "sharded"):
            for bs in (40, 48, 60):  # 40 | 1000; 48 does not divide 1000; 60 is not a multiple of 8
                parts = {{"index": [], "mask": [], "label": [], "image_sum": []}}
                for b in fpbma.data.batches(src, bs, train=False, layout=layout):
                    info[f"{{layout}}_{{bs}}_shape"] = list(b["image"].shape[:2])
                    if layout == "sharded":
                        info[f"{{layout}}_{{bs}}_ndev"] = len(b["image"].sharding.device_set)
                        b = {{k: np.asarray(v) for k, v in b.items()}}
                        b = {{k: v.reshape((8, -1) + v.shape[1:]) for k, v in b.items()}}
                    for k in ("index", "mask", "label"):
                        parts[k].append(b[k].reshape(-1))
                    parts["image_sum"].append(b["image"].reshape(b["image"].shape[0] * b["image"].shape[1], -1).sum(1))
                for k, v in parts.items():
                    arrays[f"{{layout}}_{{bs}}_{{k}}"] = np.concatenate(v)
        try:
            next(fpbma.data.batches(src, 60, train=True))
        except ValueError as e:
            info["train_error"] = str(e)
        tb = next(fpbma.data.batches(src, 64, train=True, seed=1))
        info["train_shape"] = list(tb["image"].shape)
        np.savez({str(out)!r}, **arrays)
        print(json.dumps(info))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    arrays = np.load(out)
    src = fpbma.data.load("mnist", "test", data_dir=data_dir)
    image_sums = np.array([src[i]["image"].astype(np.float64).sum() / 255.0 for i in range(len(src))])
    for layout in ("stack", "sharded"):
        for bs, padded in ((40, 40), (48, 48), (60, 64)):
            mask = arrays[f"{layout}_{bs}_mask"]
            index = arrays[f"{layout}_{bs}_index"][mask]
            np.testing.assert_array_equal(index, np.arange(1000))
            np.testing.assert_array_equal(arrays[f"{layout}_{bs}_label"][mask], src.labels)
            np.testing.assert_allclose(arrays[f"{layout}_{bs}_image_sum"][mask], image_sums, rtol=1e-5)
            assert mask.size == -(-1000 // bs) * padded
            assert info[f"{layout}_{bs}_shape"] == ([8, padded // 8] if layout == "stack" else [padded, 28])
        for bs in (40, 48, 60):
            assert info[f"sharded_{bs}_ndev"] == 8
    assert "batch_size=60 is not divisible by the 8 devices" in info["train_error"]
    assert info["train_shape"] == [8, 8, 28, 28, 1]


def test_training_shuffles_by_seed_and_drops_remainder(data_dir):
    src = fpbma.data.load("digits", "test", data_dir=data_dir)
    def orders(seed, epochs=2):
        it = fpbma.data.batches(src, 50, train=True, seed=seed, num_epochs=epochs, num_devices=1, layout="flat")
        return [b["index"] for b in it]
    a = orders(0)
    assert len(a) == 2 * (355 // 50)
    epoch0 = np.concatenate(a[:7])
    assert np.unique(epoch0).size == 350  # no example twice within an epoch, 5 dropped
    assert not np.array_equal(epoch0, np.concatenate(a[7:]))  # reshuffled each epoch
    for x, y in zip(a, orders(0)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(epoch0, np.concatenate(orders(1)[:7]))
    assert all(b["mask"].all() for b in fpbma.data.batches(src, 50, train=True, num_devices=1))


def _padded_crops(image, pad):
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    return [padded[t:t + h, l:l + w] for t in range(2 * pad + 1) for l in range(2 * pad + 1)]


@pytest.mark.parametrize("name, flips", [("digits", False), ("fashion_mnist", True)])
def test_augmentation_is_a_padded_crop_and_flips_only_where_allowed(data_dir, name, flips):
    src = fpbma.data.load(name, "test", data_dir=data_dir).subset(np.arange(64))
    batch = next(fpbma.data.batches(src, 64, train=True, seed=0, layout="flat", crop_padding=2))
    n_flip_only = 0
    for img, i in zip(batch["image"], batch["index"]):
        original = src[int(i)]["image"]
        out = np.round(img * 255).astype(np.uint8)
        plain = any(np.array_equal(out, c) for c in _padded_crops(original, 2))
        mirrored = any(np.array_equal(out, c) for c in _padded_crops(original[:, ::-1], 2))
        assert plain or mirrored
        n_flip_only += mirrored and not plain
    if flips:
        assert n_flip_only > 10  # about half of 64 images are mirrored
    else:
        assert n_flip_only == 0


def test_normalisation_and_resize(data_dir):
    src = fpbma.data.load("digits", "test", data_dir=data_dir)
    batch = next(fpbma.data.batches(src, 16, train=False, layout="flat", mean=0.5, std=0.25))
    raw = np.stack([src[i]["image"] for i in range(16)]).astype(np.float32)
    np.testing.assert_allclose(batch["image"], (raw / 255 - 0.5) / 0.25, atol=1e-6)
    resized = next(fpbma.data.batches(src, 4, train=False, layout="flat", image_size=(16, 24)))
    assert resized["image"].shape == (4, 16, 24, 1)
    # Bilinear resizing preserves the mean brightness up to edge effects.
    np.testing.assert_allclose(resized["image"].mean(axis=(1, 2, 3)), raw[:4].mean(axis=(1, 2, 3)) / 255, atol=0.03)
    same = next(fpbma.data.batches(src, 4, train=False, layout="flat", image_size=(8, 8)))
    np.testing.assert_array_equal(same["image"], raw[:4] / np.float32(255))


def test_bad_arguments(data_dir):
    src = fpbma.data.load("digits", "test", data_dir=data_dir)
    with pytest.raises(ValueError, match="layout must be one of"):
        next(fpbma.data.batches(src, 8, train=False, layout="pmap"))
    with pytest.raises(ValueError, match="at least one full batch"):
        next(fpbma.data.batches(src, 1000, train=True, num_devices=1))
