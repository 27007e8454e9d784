"""Bad input to the experiments: one line ``error: ...`` naming the problem and the fix, before any work.

Each case runs the stage on the tiny config and checks the message and that nothing was written (or, for a
damaged cache file or checkpoint in an existing work dir, that no file changed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import config_checks, training
from experiments import pipeline as stages
from tests.experiment_utils import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(directory: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("overrides, message", [
    ({"seeds": ()}, r"config.seeds is empty: the main job would train nothing; pass e.g. --config.seeds=0,1,2."),
    ({"seeds": (0, 1, 0)}, r"config.seeds=\(0, 1, 0\) repeats \[0\]: .*pass each seed once, e.g. --config.seeds=0,1."),
    ({"transfer.learning_rate": float("nan")}, r"config.transfer.learning_rate=nan is not a finite number"),
    ({"hparams.fpbma.rho": float("inf")}, r"config.hparams.fpbma.rho=inf is not a finite number"),
    ({"transfer.learning_rate": 0.0}, r"config.transfer.learning_rate=0.0 must be a number > 0."),
    ({"prior.min_var": -1e-8}, r"config.prior.min_var=-1e-08 must be a number > 0."),
    ({"transfer.kl_weight": 0.0}, r"config.transfer.kl_weight=0.0 must be a number > 0."),
    ({"hparams.sam.learning_rate": -0.1}, r"config.hparams.sam.learning_rate=-0.1 must be a number > 0."),
])
def test_bad_numbers_and_seeds_fail_before_any_work(tmp_path, overrides, message):
    workdir = tmp_path / "wd"
    with pytest.raises(config_checks.ConfigError, match=message):
        stages.run_stage("transfer", tiny_config(workdir, **overrides))
    assert not workdir.exists()


def test_a_workdir_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(config_checks.ConfigError, match=r"cannot be created: .*file is a file, not a folder; pass "
                                                        r"--workdir=DIR with a folder you can write to."):
        stages.run_stage("pretrain", tiny_config(blocker / "wd"))
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_workdir_is_refused(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(config_checks.ConfigError, match="is not writable"):
            stages.run_stage("pretrain", tiny_config(parent / "wd"))
    finally:
        parent.chmod(0o700)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A work dir after the tiny pre-training and prior (the stages the others restore)."""
    workdir = tmp_path_factory.mktemp("pretrained")
    config = tiny_config(workdir)
    training.pretrain(config)
    training.fit_prior(config)
    return workdir


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _assert_refused_and_untouched(workdir: Path, start: str, end: str) -> None:
    """The main job on ``workdir`` raises one ConfigError starting and ending so, and no file changes."""
    before = _snapshot(workdir)
    with pytest.raises(config_checks.ConfigError) as e:
        stages.run_stage("transfer", tiny_config(workdir))
    assert str(e.value).startswith(start)
    assert str(e.value).endswith(end)
    assert _snapshot(workdir) == before


def test_a_damaged_cache_file_is_named_with_the_fix(pretrained, tmp_path):
    workdir = _copy(pretrained, tmp_path / "wd")
    (cache,) = (workdir / "data").glob("mnist*.npz")
    cache.write_bytes(cache.read_bytes()[:1000])  # truncated, as by a full disk or a killed copy
    _assert_refused_and_untouched(workdir, f"cache file {cache} is damaged (",
                                  f"delete it (rm '{cache}') and run again: it is rebuilt from the dataset.")


def test_a_damaged_checkpoint_is_named_with_the_fix(pretrained, tmp_path):
    workdir = _copy(pretrained, tmp_path / "wd")
    (final,) = workdir.glob("prior-*/final")
    for f in final.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 16)  # every file of the checkpoint overwritten
    _assert_refused_and_untouched(workdir, f"checkpoint {final} cannot be restored (",
                                  f"delete it (rm -r '{final}') and run again: that stage is rebuilt.")


def test_the_command_line_prints_one_line_for_a_non_finite_rate(tmp_path):
    workdir = tmp_path / "wd"
    proc = subprocess.run([sys.executable, "-m", "experiments.transfer", "--config=experiments/configs/tiny.py",
                           f"--workdir={workdir}", "--config.transfer.learning_rate=nan"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "error: config.transfer.learning_rate=nan is not a finite number; pass a finite value "
        "(e.g. --config.transfer.learning_rate=...)."]
    assert not workdir.exists()
