"""The embedding workers' read-ahead hint: which files it advises, and that the kernel then has the bytes."""

from __future__ import annotations

import ctypes
import io
import mmap
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.sources.items import ImageRef
from retrieval.sources.readahead import readahead
from retrieval.sources.webdataset_tar import read_tar_shard

SIZE = 1 << 20  # per member / file: large enough that the page cache state is unambiguous


def _payload(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8).tobytes()


def _shard(path: Path, keys: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for n, key in enumerate(keys):
            for ext, data in (("jpg", _payload(n)), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cached(path: Path, offset: int, size: int) -> bool:
    """Whether ``size`` bytes at ``offset`` are in the page cache (``mincore`` on a mapping: it reads nothing)."""
    page = mmap.PAGESIZE
    start = offset - offset % page
    length = offset + size - start
    libc = ctypes.CDLL(None, use_errno=True)
    with (
        open(path, "rb") as handle,
        mmap.mmap(handle.fileno(), length, access=mmap.ACCESS_COPY, offset=start) as mapped,
    ):
        view = ctypes.c_char.from_buffer(mapped)
        pages = (ctypes.c_ubyte * (-(-length // page)))()
        failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(length), pages)
        del view  # the mapping closes only once no pointer into it is left
    if failed:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return all(flag & 1 for flag in pages)


def _items(tmp_path: Path) -> tuple[list[ImageRef], list[Path]]:
    shards = [_shard(tmp_path / "a.tar", ["k0", "k1"]), _shard(tmp_path / "b.tar", ["k2"])]
    refs = [ref for shard in shards for ref in read_tar_shard(shard).images]
    loose = []
    for n in range(2):
        loose.append(tmp_path / f"loose{n}.jpg")
        loose[-1].write_bytes(_payload(10 + n))
    return refs + [ImageRef(path=path) for path in loose], shards + loose


def test_one_hint_per_shard_and_per_loose_file_and_none_for_what_is_gone(tmp_path):
    refs, _ = _items(tmp_path)
    assert readahead(refs) == 4  # a.tar (two members, one span), b.tar, two loose files
    gone = [ImageRef(path=tmp_path / "missing.jpg"), ImageRef(uri="mem://x", opener=lambda: b"")]
    assert readahead(gone) == 0  # a missing file and bytes from elsewhere: no hint, no error


def test_members_far_apart_get_a_hint_each_instead_of_one_over_everything_between():
    from retrieval.sources.readahead import SLACK, member_spans

    close = [(512, 1000), (2048, 1000), (4096, 1000)]
    assert member_spans(close) == [(512, 4584)]
    far = [(512, 1000), (512 + 4 * SLACK, 1000)]
    assert member_spans(far) == far


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and posix_fadvise as Linux has them")
def test_after_the_hint_the_bytes_are_in_the_page_cache(tmp_path):
    refs, files = _items(tmp_path)
    members = [(Path(ref.opener.path), ref.opener.offset, ref.opener.size) for ref in refs if ref.opener is not None]
    wanted = members + [(path, 0, SIZE) for path in files[2:]]
    for path in files:
        _evict(path)
    if any(_cached(*where) for where in wanted):
        pytest.skip("this file system keeps evicted pages (tmpfs?): nothing to measure")
    readahead(refs)
    deadline = time.monotonic() + 5.0  # the hint starts reads; it does not wait for them
    while not all(_cached(*where) for where in wanted) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(_cached(*where) for where in wanted)
