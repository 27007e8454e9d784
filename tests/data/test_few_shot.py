"""Few-shot splits and CoOp split files on the real offline datasets."""

import json

import numpy as np
import pytest

import fpbma.data


@pytest.fixture(scope="module")
def mnist(data_dir):
    return fpbma.data.load("mnist", "train", data_dir=data_dir), fpbma.data.load("mnist", "test", data_dir=data_dir)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_exactly_k_per_class_and_deterministic(mnist, k):
    train_src, _ = mnist
    idx = fpbma.data.few_shot(train_src, k, seed=3)
    labels = np.asarray([train_src[i]["label"] for i in idx])  # read back, not from the cached labels
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, k))
    assert np.unique(idx).size == idx.size
    np.testing.assert_array_equal(idx, fpbma.data.few_shot(train_src, k, seed=3))
    assert not np.array_equal(idx, fpbma.data.few_shot(train_src, k, seed=4))


def test_train_validation_test_disjoint(mnist):
    train_src, test_src = mnist
    split = fpbma.data.few_shot_split(train_src, 8, seed=0, val_per_class=5)
    np.testing.assert_array_equal(split.train, fpbma.data.few_shot(train_src, 8, seed=0))
    np.testing.assert_array_equal(np.bincount(train_src.labels[split.validation], minlength=10), np.full(10, 5))
    assert np.intersect1d(split.train, split.validation).size == 0
    # Source-array ids: few-shot train and validation never reach the test split.
    ids = np.asarray(train_src.feature_values("id"))
    test_ids = np.asarray(test_src.feature_values("id"))
    assert np.intersect1d(ids[np.concatenate([split.train, split.validation])], test_ids).size == 0


def test_validation_fraction_and_exclude(mnist):
    train_src, _ = mnist
    excluded = np.flatnonzero(train_src.labels == 2)[:300]  # leaves 100 examples of class 2
    split = fpbma.data.few_shot_split(train_src, 10, seed=1, val_fraction=0.25, exclude=excluded)
    counts = np.bincount(train_src.labels[split.validation], minlength=10)
    expected = np.full(10, int(np.ceil(0.25 * (400 - 10))))
    expected[2] = int(np.ceil(0.25 * (100 - 10)))
    np.testing.assert_array_equal(counts, expected)
    assert np.intersect1d(np.concatenate(split), excluded).size == 0


def test_too_few_examples_in_a_class(data_dir):
    digits = fpbma.data.load("digits", "test", data_dir=data_dir)
    smallest = int(np.argmin(np.bincount(digits.labels)))
    k = int(np.bincount(digits.labels).min()) + 1
    with pytest.raises(ValueError, match=f"Class {smallest} has {k - 1} available examples, fewer than k={k}"):
        fpbma.data.few_shot(digits, k, seed=0)


def test_coop_split_file_maps_onto_sources(tmp_path, data_dir):
    from sklearn.datasets import load_digits

    d = load_digits()
    train_src = fpbma.data.load("digits", "train", data_dir=data_dir)
    test_src = fpbma.data.load("digits", "test", data_dir=data_dir)
    train_ids = np.asarray(train_src.feature_values("id"))
    test_ids = np.asarray(test_src.feature_values("id"))
    rng = np.random.default_rng(0)
    chosen = {"train": rng.choice(train_ids, 20, replace=False), "val": rng.choice(test_ids, 7, replace=False),
              "test": np.concatenate([rng.choice(train_ids, 3, replace=False), rng.choice(test_ids, 4, replace=False)])}
    # CoOp's layout: [relative path, label, class name]; here the file stem is the sklearn row.
    content = {s: [[f"{d.target[i]}/{i}.png", int(d.target[i]), f"digit {d.target[i]}"] for i in ids]
               for s, ids in chosen.items()}
    split_file = tmp_path / "split_zhou_Digits.json"
    split_file.write_text(json.dumps(content))
    parsed = fpbma.data.read_coop_split(split_file)
    assert [len(parsed[s]) for s in ("train", "val", "test")] == [20, 7, 7]
    assert parsed["val"][0].path == content["val"][0][0]
    subsets, class_names = fpbma.data.coop_subsets(split_file, {"train": train_src, "test": test_src}, key="id")
    for s, ids in chosen.items():
        sub = subsets[s]
        assert len(sub) == len(ids)
        for j, row in enumerate(ids):
            ex = sub[j]
            np.testing.assert_array_equal(ex["image"][..., 0], np.round(d.images[row] * 255 / 16))
            assert ex["label"] == d.target[row]
    rows = np.concatenate(list(chosen.values()))
    assert set(class_names) == {f"digit {c}" for c in d.target[rows]}


def test_coop_split_errors(tmp_path, data_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": [["a.png", "zero", "x"]], "val": [], "test": []}))
    with pytest.raises(ValueError, match=r"train\[0\].*is not \[path, label, classname\]"):
        fpbma.data.read_coop_split(bad)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"train": [["x/999999.png", 0, "0"]], "val": [], "test": []}))
    src = fpbma.data.load("digits", "test", data_dir=data_dir)
    with pytest.raises(KeyError, match="999999"):
        fpbma.data.coop_subsets(missing, {"test": src}, key="id")
