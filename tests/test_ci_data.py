"""CI cannot pass without ../shared/data: ``.ci/run`` refuses to start, and under ``CI`` a test of
real photos that would skip for want of them fails instead.

Both are checked on copies placed where ../shared/data does not exist (a temporary folder).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DATA_TESTS = """
import pytest
from conftest import require_shared_data


def test_uses_the_fixture():
    require_shared_data()


@pytest.mark.skipif(True, reason="shared data not available")
def test_skips_for_want_of_data():
    pass


@pytest.mark.skipif(True, reason="no CUDA device")
def test_skips_for_another_reason():
    pass
"""


def _clone_without_data(tmp_path: Path) -> Path:
    """A copy of tests/conftest.py and a few data tests in <tmp>/clone/tests, with no <tmp>/shared/data."""
    clone = tmp_path / "clone"
    (clone / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "conftest.py", clone / "tests" / "conftest.py")
    (clone / "tests" / "test_data.py").write_text(DATA_TESTS)
    assert not (tmp_path / "shared").exists()
    return clone


def _pytest(clone: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci is not None else {})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", "tests"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_data_tests_skip_outside_ci(tmp_path):
    done = _pytest(_clone_without_data(tmp_path), None)
    assert done.returncode == 0 and "3 skipped" in done.stdout, done.stdout[-2000:]


def test_data_tests_fail_under_ci(tmp_path):
    done = _pytest(_clone_without_data(tmp_path), "true")
    assert done.returncode == 1 and "1 failed, 1 skipped, 1 error" in done.stdout, done.stdout[
        -2000:
    ]  # a skipif fails at setup: an error
    assert "CI must run the tests of real photos" in done.stdout
    assert "under CI the tests of real photos must run" in done.stdout


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("bash") is None, reason="needs bash and make")
def test_ci_run_refuses_to_start_without_the_data(tmp_path):
    clone = tmp_path / "clone"
    (clone / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", clone / ".ci" / "run")
    (clone / "Makefile").write_text("test:\n\t@echo make-test-ran CI=$$CI\n")
    missing = subprocess.run(["bash", str(clone / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "make-test-ran" not in missing.stdout
    assert "test data missing" in missing.stderr and "shared/data/coco-train-mini" in missing.stderr, missing.stderr
    for need in ("coco-train-mini", "imagenet-sample", "cifar10-test/test"):
        (tmp_path / "shared" / "data" / need).mkdir(parents=True)
    (tmp_path / "shared" / "data" / "coco-train-mini" / "captions.jsonl").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    present = subprocess.run(["bash", str(clone / ".ci" / "run")], capture_output=True, text=True, timeout=60, env=env)
    assert present.returncode == 0 and "make-test-ran CI=1" in present.stdout, present.stderr
