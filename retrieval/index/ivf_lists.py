"""One index from many parts, and many index shards from one index: IVF inverted lists moved between FAISS indexes.

A distributed build trains an IVF (or OPQ+IVF+PQ) index once, fills trained empty copies
with contiguous ranges of rows under their global ids (:func:`fill_range`, one Ray task
each), and merges the parts' inverted lists (:func:`merge_in_ram`, or
:func:`merge_on_disk` into one ``.ivfdata`` file, as autofaiss does). Each list then holds
its entries in id order, exactly as a sequential ``add`` of all rows leaves it, so the
merged index answers every query as the single-machine index with the same quantizer.

:func:`split_index` cuts an index into index shards over contiguous row ranges; shards of an
IVF index share its quantizer, so a query probes the same lists in every shard.

FAISS traps: an index whose lists live in an ``.ivfdata`` file crashes on search when read
with ``IO_FLAG_MMAP``; read it with :func:`read_ondisk_index`. The ``.index`` file stores the
``.ivfdata`` path: it is read with ``IO_FLAG_ONDISK_SAME_DIR``, so the directory may move.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.core.errors import IndexFormatError, InputError
from retrieval.index.native_stdout import native_stdout_to_stderr
from retrieval.index.source import ADD_CHUNK, VectorSource, as_source
from retrieval.index.vector_index import empty_copy, is_ivf, without_prefetch_threads


def _ivf(index: Any) -> Any:
    import faiss

    return faiss.extract_index_ivf(index)


def _set_total(index: Any, total: int) -> None:
    """Set ``ntotal`` on ``index`` and every wrapper down to its IVF core (FAISS keeps one per level)."""
    import faiss

    node = faiss.downcast_index(index)
    while True:
        node.ntotal = total
        inner = getattr(node, "index", None)
        if inner is None or not isinstance(node, faiss.IndexPreTransform):
            break
        node = faiss.downcast_index(inner)
    _ivf(index).ntotal = total


def fill_range(trained: Any, vectors: VectorSource | np.ndarray, first_id: int) -> Any:
    """A trained empty copy of ``trained`` holding ``vectors`` under ids ``first_id, first_id + 1, ...``."""
    if not is_ivf(trained):
        raise InputError(
            "only IVF-based indexes (ivf, ivfsq, ivfpq) are built from parts; HNSW graphs cannot be merged"
        )
    part = empty_copy(trained)
    start = first_id
    for chunk in as_source(vectors).chunks(ADD_CHUNK):
        part.add_with_ids(chunk, np.arange(start, start + len(chunk), dtype=np.int64))
        start += len(chunk)
    return part


def _list_entries(lists: Any, number: int) -> tuple[np.ndarray, np.ndarray]:
    from faiss.contrib.inspect_tools import get_invlist

    ids, codes = get_invlist(lists, number)
    return np.asarray(ids, np.int64), np.asarray(codes, np.uint8)


def _copy_entries(lists: Any, out: Any, low: int, high: int, shift: int) -> int:
    """Append the entries of the inverted ``lists`` whose ids are in [low, high) to ``out``, ids minus ``shift``."""
    import faiss

    added = 0
    for number in range(lists.nlist):
        if not lists.list_size(number):
            continue
        ids, codes = _list_entries(lists, number)
        keep = (ids >= low) & (ids < high)
        if not keep.any():
            continue
        ids = np.ascontiguousarray(ids[keep] - shift)
        codes = np.ascontiguousarray(codes.reshape(len(keep), -1)[keep])
        out.add_entries(number, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
        added += len(ids)
    return added


def merge_in_ram(trained: Any, parts: Sequence[Any]) -> Any:
    """One index holding the lists of ``parts`` (copies of ``trained``), appended in the order given."""
    merged = empty_copy(trained)
    everything = np.iinfo(np.int64).max
    total = sum(_copy_entries(_ivf(part).invlists, _ivf(merged).invlists, 0, everything, 0) for part in parts)
    _set_total(merged, total)
    return merged


def merge_on_disk(trained: Any, part_paths: Sequence[str | Path], lists_path: str | Path) -> Any:
    """``trained`` (emptied) with the lists of the part files merged into ``lists_path`` (``faiss.contrib.ondisk``).

    The lists are written to a temporary name first and renamed into place; the returned
    index names ``lists_path`` (write it with ``faiss.write_index`` next to that file).
    """
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    lists_path = Path(lists_path)
    scratch = lists_path.with_name(f".{lists_path.name}.tmp")
    scratch.unlink(missing_ok=True)
    merged = empty_copy(trained)
    with native_stdout_to_stderr():  # FAISS prints "resizing ..."
        merge_ondisk(merged, [str(p) for p in part_paths], str(scratch))
    os.replace(scratch, lists_path)
    lists: Any = faiss.downcast_InvertedLists(_ivf(merged).invlists)
    lists.filename = str(lists_path)  # the name the .index file records (its folder is replaced on read)
    return merged


def has_ondisk_lists(index: Any) -> bool:
    import faiss

    return is_ivf(index) and isinstance(faiss.downcast_InvertedLists(_ivf(index).invlists), faiss.OnDiskInvertedLists)


def read_ondisk_index(path: str | Path, lists_path: str | Path, in_memory: bool = False) -> Any:
    """Read an index whose lists are in the ``.ivfdata`` file ``lists_path`` next to it, memory-mapped read-only.

    Never with ``IO_FLAG_MMAP`` (FAISS crashes on the first search); ``IO_FLAG_ONDISK_SAME_DIR``
    finds the lists next to ``path`` wherever the directory moved. ``in_memory``: the lists are
    copied into RAM (an index that is to be added to).
    """
    import faiss

    path, lists_path = Path(path), Path(lists_path)
    if path.parent != lists_path.parent:
        raise IndexFormatError(f"{lists_path}: the IVF lists must sit next to {path}")
    with native_stdout_to_stderr():  # FAISS prints "updating ondisk filename ..." when the folder moved
        index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    lists = faiss.downcast_InvertedLists(_ivf(index).invlists) if is_ivf(index) else None
    if not isinstance(lists, faiss.OnDiskInvertedLists) or Path(lists.filename).name != lists_path.name:
        raise IndexFormatError(f"{path}: does not keep its IVF lists in {lists_path.name}; rebuild the index")
    _check_list_bounds(lists, os.path.getsize(lists_path), lists_path)
    if in_memory:
        return _lists_into_ram(index)
    return without_prefetch_threads(index)


def _check_list_bounds(lists: Any, size: int, where: Path) -> None:
    """Every list lies inside the ``.ivfdata`` file (FAISS reads list offsets unchecked: a bad one would crash a
    search)."""
    entry = int(lists.code_size) + 8  # codes, then 8-byte ids, per slot
    if int(lists.totsize) != size:
        raise IndexFormatError(
            f"{where}: {size} bytes, its index says {int(lists.totsize)}; the lists are damaged, rebuild the index"
        )
    for number in range(lists.nlist):
        item = lists.lists.at(number)
        if item.size > item.capacity or (item.capacity and item.offset + item.capacity * entry > size):
            raise IndexFormatError(
                f"{where}: inverted list {number} lies outside the file; the lists are damaged, rebuild the index"
            )


def _lists_into_ram(index: Any) -> Any:
    """``index`` with its on-disk lists replaced by a copy in memory (FAISS cannot clone on-disk lists)."""
    import faiss

    ivf = _ivf(index)
    copy: Any = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    _copy_entries(ivf.invlists, copy, 0, np.iinfo(np.int64).max, 0)
    ivf.replace_invlists(copy, True)
    copy.this.disown()  # the index owns it now
    return index


def shard_bounds(total: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous row ranges covering ``total`` rows, sizes differing by at most one."""
    if shards < 1:
        raise InputError(f"index shards must be >= 1, got {shards}")
    if total < shards:
        raise InputError(f"{total} vectors cannot fill {shards} index shards; use fewer shards")
    edges = [total * number // shards for number in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def split_index(index: Any, bounds: Sequence[tuple[int, int]]) -> list[Any]:
    """Independent indexes over the row ranges ``bounds`` (rows renumbered from 0 in each).

    Flat indexes get their rows; IVF-based ones a trained empty copy filled with the entries of
    their range (same quantizer and codes, so every shard probes the lists the whole index would).
    """
    import faiss

    if is_ivf(index):
        shards = []
        for low, high in bounds:
            shard = empty_copy(index)
            _set_total(shard, _copy_entries(_ivf(index).invlists, _ivf(shard).invlists, low, high, low))
            shards.append(shard)
        return shards
    flat = faiss.downcast_index(index)
    if not isinstance(flat, faiss.IndexFlat):
        raise InputError(
            f"a {type(flat).__name__} index cannot be split into shards; use flat or an IVF type (ivf, ivfsq, ivfpq)"
        )
    shards = []
    for low, high in bounds:
        shard = (
            faiss.IndexFlatIP(index.d)
            if index.metric_type == faiss.METRIC_INNER_PRODUCT
            else faiss.IndexFlatL2(index.d)
        )
        shard.add(flat.reconstruct_n(low, high - low))
        shards.append(shard)
    return shards
