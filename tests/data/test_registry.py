"""The dataset registry, the import graph of fpbma.data, and the one route to corrupted images."""

import ast
import os
import subprocess
import sys

import numpy as np
import pytest

import fpbma.data
from fpbma.data import registry, shifted, sources

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_registry_names_equal_the_old_tuples():
    assert registry.names("offline") == ("mnist", "digits", "fashion_mnist")
    assert registry.names("shifted") == ("mnist_corrupted", "digits_corrupted", "fashion_mnist_corrupted")
    assert fpbma.data.OFFLINE_DATASETS == ("mnist", "digits", "fashion_mnist")
    assert fpbma.data.SHIFTED_DATASETS == tuple(f"{n}_corrupted" for n in fpbma.data.OFFLINE_DATASETS)
    assert fpbma.data.KNOWN_DATASETS == (fpbma.data.OFFLINE_DATASETS + fpbma.data.SHIFTED_DATASETS
                                         + fpbma.data.PAPER_DATASETS)
    assert registry.names() == fpbma.data.OFFLINE_DATASETS + fpbma.data.SHIFTED_DATASETS
    assert all(registry.get(f"{b}_corrupted").base == b for b in fpbma.data.OFFLINE_DATASETS)


def test_unknown_and_duplicate_names_raise_one_line():
    with pytest.raises(registry.RegistryError, match="Unknown registered dataset 'nope'.*digits") as e:
        registry.get("nope")
    assert "\n" not in str(e.value)
    with pytest.raises(registry.RegistryError, match="'digits' is already registered") as e:
        registry.register("digits", lambda **kw: None)
    assert "\n" not in str(e.value)
    assert registry.names("offline") == ("mnist", "digits", "fashion_mnist")  # unchanged
    with pytest.raises(ValueError, match="kind must be"):
        registry.names("clean")


def test_fresh_registry_checks_kind_and_base():
    r = registry.Registry()
    r.register("toy", lambda **kw: "builder")
    with pytest.raises(registry.RegistryError, match="already registered"):
        r.register("toy", lambda **kw: None, kind="offline")
    with pytest.raises(registry.RegistryError, match="needs base= a registered offline dataset"):
        r.register("toy_corrupted", lambda **kw: None, kind="shifted", base="other")
    with pytest.raises(registry.RegistryError, match="kind must be one of"):
        r.register("x", lambda **kw: None, kind="corrupted")
    with pytest.raises(registry.RegistryError, match="takes no base"):
        r.register("y", lambda **kw: None, base="toy")
    e = r.register("toy_corrupted", lambda **kw: None, kind="shifted", base="toy")
    assert (e.name, e.kind, e.base) == ("toy_corrupted", "shifted", "toy")
    assert r.names() == ("toy", "toy_corrupted") and r.names("shifted") == ("toy_corrupted",)
    assert "toy" not in registry.REGISTRY  # the default registry is untouched


def test_unknown_dataset_message_lists_registry_names():
    with pytest.raises(ValueError, match="Unknown dataset 'nope'.*digits_corrupted.*cifar10"):
        fpbma.data.load("nope", "test")


@pytest.mark.parametrize("order", [("shifted", "sources"), ("sources", "shifted"),
                                   ("registry", "shifted"), ("builders", "sources")])
def test_no_import_cycle_in_either_order(order):
    code = "; ".join(f"import fpbma.data.{m}" for m in order) + "; import fpbma.data; print(fpbma.data.SHIFTED_DATASETS)"
    env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=_ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "digits_corrupted" in out.stdout


def _function_level_imports(module) -> list[str]:
    tree = ast.parse(open(module.__file__).read())
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    found += [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    found += [a.name for a in node.names]
    return found


def test_registry_and_shifted_do_not_import_sources():
    for module in (registry, shifted, sources):
        inner = _function_level_imports(module)
        assert not [n for n in inner if "shifted" in n or "sources" in n], (module.__name__, inner)
    registry_imports = [n.module or "" for n in ast.walk(ast.parse(open(registry.__file__).read()))
                        if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(ast.parse(open(registry.__file__).read())) if isinstance(n, ast.Import)
        for a in n.names]
    assert not [m for m in registry_imports if m.startswith("fpbma")], registry_imports
    shifted_src = open(shifted.__file__).read()
    assert "sources" not in "".join(l for l in shifted_src.splitlines() if "import" in l)


def _images(src) -> np.ndarray:
    return np.stack(src.columns("image")["image"])


@pytest.mark.parametrize("corruption, severity", [("gaussian_noise", 2), ("defocus_blur", 4), ("pixelate", 1)])
def test_corrupt_images_equals_rows_of_the_prepared_set(data_dir, corruption, severity):
    clean = fpbma.data.load("digits", "test", data_dir=data_dir)
    shift = fpbma.data.load(f"digits_corrupted/{corruption}_{severity}", "test", data_dir=data_dir)
    clean_images, stored = _images(clean), _images(shift)
    assert stored.shape == clean_images.shape == (355, 8, 8, 1)
    # Row-aligned with the clean test split: same ids and labels at every position.
    np.testing.assert_array_equal(shift.columns("id")["id"], clean.columns("id")["id"])
    np.testing.assert_array_equal(shift.labels, clean.labels)
    # The whole split, and a scattered subset corrupted on its own, row by row.
    everything = fpbma.data.corrupt_images(clean_images, corruption, severity, np.arange(len(clean)))
    np.testing.assert_array_equal(everything, stored)
    idx = np.array([354, 0, 17, 200, 17])
    subset = fpbma.data.corrupt_images(clean_images[idx], corruption, severity, idx)
    for j, i in enumerate(idx):
        np.testing.assert_array_equal(subset[j], shift[int(i)]["image"])
    assert (stored != clean_images).any()


def test_corrupt_images_works_on_unregistered_images():
    x = np.random.default_rng(1).integers(0, 256, (4, 12, 10, 3), dtype=np.uint8)
    y = fpbma.data.corrupt_images(x, "contrast", 3, [5, 6, 7, 8])
    assert y.shape == x.shape and y.dtype == np.uint8
    np.testing.assert_array_equal(y, fpbma.data.corruptions.corrupt(x, "contrast", 3, shifted.SEED,
                                                                    indices=[5, 6, 7, 8]))
    np.testing.assert_array_equal(fpbma.data.corrupt_images(x[2:], "contrast", 3, [7, 8]), y[2:])


@pytest.mark.parametrize("args, message", [
    (("not_a_corruption", 3, [0, 1]), r"Unknown corruption 'not_a_corruption'; pass one of .*CORRUPTIONS"),
    (("gaussian_noise", 0, [0, 1]), r"severity must be an int from 1 .* to 5"),
    (("gaussian_noise", 6, [0, 1]), r"severity must be an int from 1 .* to 5"),
    (("gaussian_noise", True, [0, 1]), r"severity must be an int"),
    (("gaussian_noise", 3, [0]), r"one test position per image: got 2 image\(s\).*np.arange\(len\(images\)\)"),
    (("gaussian_noise", 3, [[0, 1]]), r"one test position per image"),
    (("gaussian_noise", 3, [0, -1]), r"non-negative integer positions"),
])
def test_corrupt_images_rejects_bad_input_in_one_line(args, message):
    x = np.zeros((2, 8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match=message) as e:
        fpbma.data.corrupt_images(x, *args)
    assert "\n" not in str(e.value)
