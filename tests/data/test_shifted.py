"""Cached corrupted test sets: built from the clean split, stored exactly, ordered by severity."""

import os

import numpy as np
import pytest

import fpbma.data

corruptions = pytest.importorskip("fpbma.data.corruptions")
from fpbma.data import shifted  # noqa: E402  (needs the corruption suite)


def _by_id(src):
    cols = src.columns("image", "label", "id")
    order = np.argsort(cols["id"])
    return (np.stack(cols["image"])[order], np.asarray(cols["label"])[order], np.asarray(cols["id"])[order])


@pytest.fixture(scope="module")
def clean(data_dir):
    return _by_id(fpbma.data.load("digits", "test", data_dir=data_dir))


@pytest.mark.parametrize("corruption", ["gaussian_noise", "defocus_blur", "contrast"])
def test_corrupted_sets_match_corrupt_and_grow_with_severity(data_dir, clean, corruption):
    clean_images, clean_labels, clean_ids = clean
    distances = []
    for severity in (1, 3, 5):
        src = fpbma.data.load(f"digits_corrupted/{corruption}_{severity}", "test", data_dir=data_dir)
        assert src.info.image_shape == (8, 8, 1) and src.info.num_classes == 10
        images, labels, ids = _by_id(src)
        np.testing.assert_array_equal(ids, clean_ids)
        np.testing.assert_array_equal(labels, clean_labels)
        # The cache holds exactly corrupt() of the clean split (applied in stored clean order).
        clean_src = fpbma.data.load("digits", "test", data_dir=data_dir)
        stored_clean = np.stack(clean_src.columns("image")["image"])
        expected = corruptions.corrupt(stored_clean, corruption, severity, shifted.SEED)
        order = np.argsort(clean_src.columns("id")["id"])
        np.testing.assert_array_equal(images, expected[order])
        distances.append(np.abs(images.astype(float) - clean_images.astype(float)).mean())
    assert distances[0] > 0
    assert distances[0] < distances[1] < distances[2], distances


def test_rebuild_in_another_dir_is_identical(data_dir, tmp_path):
    first = _by_id(fpbma.data.load("digits_corrupted/impulse_noise_2", "test", data_dir=data_dir))
    second = _by_id(fpbma.data.load("digits_corrupted/impulse_noise_2", "test", data_dir=str(tmp_path)))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name, message", [
    ("digits_corrupted/not_a_corruption_3", "Unknown corruption 'not_a_corruption'.*gaussian_noise"),
    ("digits_corrupted/gaussian_noise_6", r"severity in \(1, 2, 3, 4, 5\)"),
    ("digits_corrupted", "needs a corruption and severity"),
])
def test_bad_corrupted_names_fail_before_writing(tmp_path, name, message):
    with pytest.raises(ValueError, match=message):
        fpbma.data.load(name, "test", data_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
