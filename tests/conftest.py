"""Shared fixtures: real photos from ../shared/data and a tiny CLIP model on disk.

Without ../shared/data the tests of real photos skip, except under CI (the ``CI`` environment
variable set, as ``.ci/run`` does): there they fail, so that a CI run cannot pass without them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COCO = SHARED_DATA / "coco-train-mini"
IMAGENET = SHARED_DATA / "imagenet-sample"

# Where the query-side tests run their encoders and searches: "cpu" here and in CI; a GPU machine
# sets RETRIEVAL_TEST_DEVICE=cuda to run the same tests (routes, 16 threads) on CUDA.
TEST_DEVICE = os.environ.get("RETRIEVAL_TEST_DEVICE", "cpu")


def under_ci() -> bool:
    """Whether this is a CI run (``CI`` set to anything but empty, 0 or false)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_shared_data() -> None:
    """Skip the calling test without the real photos; fail it under CI."""
    if not (COCO / "captions.jsonl").is_file():
        missing = f"real photos not found at {SHARED_DATA}"
        if under_ci():
            pytest.fail(f"{missing}: CI must run the tests of real photos (the CI environment variable is set)")
        pytest.skip(missing)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a test that skips for want of test data (its own skip or skipif) fails instead."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and under_ci() and not hasattr(report, "wasxfail")):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if "data" in reason.lower() or "photos" in reason.lower():
        report.outcome = "failed"
        report.longrepr = f"{reason}: under CI the tests of real photos must run, not skip"


def coco_pairs(n_images: int) -> list[dict]:
    """The COCO caption rows of the first ``n_images`` photos (in file order)."""
    rows = [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines() if line.strip()]
    keep: list[str] = []
    for row in rows:
        if row["image"] not in keep and len(keep) < n_images:
            keep.append(row["image"])
    return [row for row in rows if row["image"] in keep]


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """CLI runs of the suite (and the subprocesses they start) keep CLIP query snapshots in a temporary
    folder, not in the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("retrieval-cache")
        patch.setenv("RETRIEVAL_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from tiny_clip import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def small_collection(tmp_path_factory) -> Path:
    """6 COCO photos copied with their pairs file (30 captions), plus one truncated JPEG."""
    require_shared_data()
    root = tmp_path_factory.mktemp("collection")
    rows = coco_pairs(6)
    (root / "images").mkdir()
    for image in {row["image"] for row in rows}:
        shutil.copy(COCO / image, root / image)
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"image": row["image"], "caption": row["caption"]}) + "\n")
    good = (COCO / rows[0]["image"]).read_bytes()
    (root / "images" / "broken.jpg").write_bytes(good[: len(good) // 3])
    (root / "captions.txt").write_text("a plate of food\na man riding a horse\n", encoding="utf-8")
    return root
