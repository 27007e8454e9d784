"""Shared fixtures: the offline datasets are built once per test session into a temporary data_dir."""

import os

import pytest



@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A fresh data_dir; each offline dataset is built there by its first ``fpbma.data.load``."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def fashion_dir():
    path = os.environ.get("FPBMA_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
    return path
