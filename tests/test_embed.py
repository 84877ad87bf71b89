"""The embedding stage's execution modes: in-process, decode workers, and encoder replicas in the workers.

Every mode must give the same rows, the same skipped files and the same vectors; the choice of
mode follows the device, the worker count and the platform.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
from conftest import COCO, IMAGENET, require_shared_data

from retrieval import EmbedOptions, InputError
from retrieval.embed.pipeline import embed_images
from retrieval.embed.workers import (
    MAX_AUTO_REPLICAS,
    MAX_AUTO_WORKERS,
    SMALL_COLLECTION,
    resolve_workers,
    use_replicas,
)
from retrieval.sources.discovery import discover_images
from retrieval.sources.items import ImageRef

LINUX = sys.platform.startswith("linux")


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """10 real photos (COCO and ImageNet sizes) with a truncated JPEG and a non-image among them."""
    require_shared_data()
    photos = sorted((COCO / "images").glob("*.jpg"))[:5] + sorted(IMAGENET.glob("*.JPEG"))[::200][:5]
    bad = tmp_path_factory.mktemp("bad")
    (bad / "truncated.jpg").write_bytes(photos[0].read_bytes()[:3000])
    (bad / "notes.jpg").write_bytes(b"not an image at all")
    return discover_images(photos[:3] + [bad / "truncated.jpg"] + photos[3:7] + [bad / "notes.jpg"] + photos[7:])[0]


@pytest.fixture(scope="module")
def tiny(tiny_clip_dir):
    from retrieval.encoders import load_clip_encoder

    return load_clip_encoder("open_clip:tiny", checkpoint=str(tiny_clip_dir), device="cpu")


@pytest.fixture(scope="module")
def effnet():
    from retrieval.encoders import load_image_encoder

    return load_image_encoder("efficientnet-lite0", device="cpu")


def _summary(embedded):
    rows = [(str(r.ref.path), r.width, r.height, r.sha256) for r in embedded.rows]
    errors = [(e.path, e.reason) for e in embedded.errors]
    return rows, errors


@pytest.mark.parametrize("name", ["tiny", "effnet"])
def test_every_mode_gives_the_same_embedding(request, name, refs):
    encoder = request.getfixturevalue(name)
    modes = {
        "in process": EmbedOptions(batch_size=3, workers=0, progress=False),
        "decode workers": EmbedOptions(batch_size=3, workers=2, replicas=False, progress=False),
    }
    if LINUX:
        modes["encoder replicas"] = EmbedOptions(batch_size=3, workers=2, replicas=True, progress=False)
    results = {mode: embed_images(refs, encoder, options) for mode, options in modes.items()}
    expected = results.pop("in process")
    rows, errors = _summary(expected)
    assert len(rows) == 10 and len(errors) == 2
    assert {path.rsplit("/", 1)[-1] for path, _ in errors} == {"truncated.jpg", "notes.jpg"}
    for mode, got in results.items():
        assert _summary(got) == (rows, errors), mode
        # the same batches through the same arithmetic; a replica's single thread and the main
        # process's two may round a few values differently in the last bit (measured <= 6e-8)
        assert got.vectors.dtype == np.float32
        np.testing.assert_allclose(got.vectors, expected.vectors, rtol=0, atol=1e-6, err_msg=mode)


def test_items_read_through_an_opener_embed_like_files_in_every_mode(tiny, refs):
    """Bytes from a dict instead of files (a tar member, a parquet cell...): the same vectors in
    every mode; an opener that fails costs its item, reported under the item's uri."""
    blobs = {f"tar://batch-0.tar#{ref.path.name}": ref.path.read_bytes() for ref in refs}
    items = [ImageRef(uri=uri, opener=functools.partial(blobs.__getitem__, uri), source="batch-0.tar") for uri in blobs]
    assert refs[3].path.name == "truncated.jpg"  # in its place (the same batches: int8 layers scale per batch)
    items[3] = ImageRef(
        uri="tar://batch-0.tar#missing.jpg", opener=functools.partial(blobs.__getitem__, "nope"), source="batch-0.tar"
    )
    from_files = embed_images(refs, tiny, EmbedOptions(batch_size=3, workers=0, progress=False))
    modes = [
        EmbedOptions(batch_size=3, workers=0, progress=False),
        EmbedOptions(batch_size=3, workers=2, replicas=False, progress=False),
    ]
    if LINUX:
        modes.append(EmbedOptions(batch_size=3, workers=2, replicas=True, progress=False))
    for options in modes:
        got = embed_images(items, tiny, options)
        assert [r.ref.location.rsplit("#", 1)[1] for r in got.rows] == [r.ref.path.name for r in from_files.rows]
        assert [(r.width, r.height, r.sha256) for r in got.rows] == [
            (r.width, r.height, r.sha256) for r in from_files.rows
        ]
        np.testing.assert_allclose(got.vectors, from_files.vectors, rtol=0, atol=1e-6)
        reasons = {e.path: e.reason for e in got.errors}
        assert len(reasons) == 2 and reasons["tar://batch-0.tar#missing.jpg"].startswith("cannot read: KeyError")
        assert [ImageRef(uri=r.ref.location, opener=bytes).id for r in got.rows] == [r.ref.id for r in got.rows]


def test_worker_counts():
    assert resolve_workers(3, 10) == 3  # explicit counts are kept, small collection or not
    assert resolve_workers("auto", SMALL_COLLECTION - 1) == 0
    many = resolve_workers("auto", 10_000)
    assert 1 <= many <= MAX_AUTO_WORKERS
    assert many <= resolve_workers("auto", 10_000, replicas=True) <= MAX_AUTO_REPLICAS


def test_replicas_follow_device_workers_and_platform(monkeypatch):
    import retrieval.embed.workers as workers

    monkeypatch.setattr(workers, "_cores", lambda: 4)
    assert use_replicas(None, "cuda", "auto", 10_000) is False  # a GPU encoder stays in the main process
    assert use_replicas(None, "cpu", 0, 10_000) is False
    assert use_replicas(None, "cpu", 1, 10_000) is False  # one replica: no better than the main process
    assert use_replicas(None, "cpu", "auto", 10) is False  # too few images for worker processes
    assert use_replicas(False, "cpu", "auto", 10_000) is False
    if LINUX:
        assert use_replicas(None, "cpu", "auto", 10_000) is True
        assert use_replicas(True, "cpu", 1, 10) is True
    with pytest.raises(InputError, match="CPU"):
        use_replicas(True, "cuda:0", 2, 10_000)
    with pytest.raises(InputError, match="`EmbedOptions.workers`"):
        use_replicas(True, "cpu", 0, 10_000)
    monkeypatch.setattr(workers, "fork_context", lambda: None)  # as on macOS / Windows
    assert use_replicas(None, "cpu", "auto", 10_000) is False
    with pytest.raises(InputError, match="fork"):
        use_replicas(True, "cpu", 2, 10_000)
    monkeypatch.setattr(workers, "_cores", lambda: 1)
    monkeypatch.setattr(workers, "fork_context", lambda: "fork")
    assert use_replicas(None, "cpu", "auto", 10_000) is False  # one core: one worker


def test_batch_size_follows_the_device_unless_given():
    from retrieval.embed.pipeline import CPU_BATCH_SIZE, CUDA_BATCH_SIZE

    assert EmbedOptions().resolved_batch_size("cpu") == CPU_BATCH_SIZE == 32
    assert EmbedOptions().resolved_batch_size("cuda:1") == CUDA_BATCH_SIZE == 256
    assert EmbedOptions(batch_size=7).resolved_batch_size("cuda") == 7
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(InputError, match="`EmbedOptions.batch_size`"):
            EmbedOptions(batch_size=bad)


def test_compiled_encoder_gives_the_same_vectors(tiny, refs):
    """--compile: torch.compile'd image model in the main process (slow to compile, so the tiny model)."""
    plain = embed_images(refs, tiny, EmbedOptions(batch_size=4, workers=0, progress=False))
    compiled = embed_images(refs, tiny, EmbedOptions(batch_size=4, workers=2, compile=True, progress=False))
    assert compiled.replicas is False and compiled.workers == 2  # decode workers; the main process encodes
    assert _summary(compiled) == _summary(plain)
    np.testing.assert_allclose(compiled.vectors, plain.vectors, rtol=0, atol=1e-5)
    assert "_compiled_forwards" in vars(tiny) and not vars(tiny).get("_compile_on")  # compiled, and switched off again
    if LINUX:
        with pytest.raises(InputError, match="`EmbedOptions.compile`"):
            embed_images(refs, tiny, EmbedOptions(workers=2, replicas=True, compile=True, progress=False))


class _ThreadProbe:
    """A dataset whose items report the thread settings of the process that loads them."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, position: int) -> dict:
        import os

        import torch

        limits = {}
        try:
            from threadpoolctl import threadpool_info

            limits = {info["internal_api"]: info["num_threads"] for info in threadpool_info()}
        except ImportError:
            pass
        return {
            "torch": torch.get_num_threads(),
            "interop": torch.get_num_interop_threads(),
            "env": {
                name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
            },
            "pools": limits,
        }


@pytest.mark.parametrize("context", [None, "spawn"])
def test_every_worker_runs_single_threaded_and_the_parent_is_left_alone(context):
    """Issue 17: decode workers each with a pool of threads per core fought over the cores. The
    embedding stage's worker_init_fn sets every pool of the worker to one thread, not the parent's."""
    import os

    import torch
    from torch.utils.data import DataLoader

    from retrieval.embed.workers import THREAD_ENV, WorkerInit

    env_before = {name: os.environ.get(name) for name in THREAD_ENV}
    threads_before, interop_before = torch.get_num_threads(), torch.get_num_interop_threads()
    loader = DataLoader(
        _ThreadProbe(), batch_size=None, num_workers=2, worker_init_fn=WorkerInit(), multiprocessing_context=context
    )
    for seen in loader:
        assert seen["torch"] == 1 and seen["interop"] == 1, seen
        assert set(seen["env"].values()) == {"1"}, seen
        assert all(count == 1 for count in seen["pools"].values()), seen
    assert {name: os.environ.get(name) for name in THREAD_ENV} == env_before
    assert (torch.get_num_threads(), torch.get_num_interop_threads()) == (threads_before, interop_before)
