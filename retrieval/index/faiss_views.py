"""Native re-ranking over the stored vectors without copying them: FAISS flat indexes that *view* numpy rows.

``ivfpq`` keeps only compressed codes in its index; its shortlist is re-ranked
exactly with the float16 vectors the store already holds (memory-mapped). FAISS
does that re-ranking in C++ with ``IndexRefine``, but needs the vectors as a
flat index. Since FAISS 1.10 a flat index stores its rows in a
``MaybeOwnedVector`` that can view memory it does not own, so the memory-mapped
rows become that index with no copy and no second file. The Python bindings can
only create such a view with an owner handle, which they hand out for an index
read with ``IO_FLAG_MMAP_IFC``: we read a tiny one to obtain it. The viewed
array is kept alive by the returned index.

Where this FAISS feature is missing, or the rows are not one contiguous float16
or float32 matrix (e.g. several shards after ``retrieval add``), callers fall
back to re-ranking in Python (:func:`retrieval.index.vector_index.rerank`).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np


def views_supported() -> bool:
    """Whether this FAISS can build indexes over memory it does not own."""
    import faiss

    return hasattr(faiss, "MaybeOwnedVectorUInt8") and hasattr(faiss, "IO_FLAG_MMAP_IFC")


def refine_with_rows(index: Any, rows: np.ndarray) -> Any | None:
    """A FAISS ``IndexRefine``: ``index`` finds a shortlist, ``rows`` (viewed, not copied) score it exactly.

    Inner product. Returns None when a view is not possible (old FAISS, rows not
    one C-contiguous float16/float32 matrix, or not one row per indexed vector);
    the returned index must never be added to (FAISS aborts on resizing a view).
    """
    import faiss

    usable = (
        isinstance(index, faiss.Index)
        and rows.ndim == 2
        and rows.flags.c_contiguous
        and rows.dtype in (np.float16, np.float32)
        and len(rows) == index.ntotal
        and len(rows) > 0
    )
    if not usable or not views_supported():
        return None
    d = rows.shape[1]
    flat: Any
    if rows.dtype == np.float16:
        flat = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    else:
        flat = faiss.IndexFlatIP(d)
    _view_into(flat, rows)
    refined: Any = faiss.IndexRefine(index, flat)
    refined.referenced_objects = [index, flat, rows]  # IndexRefine holds raw pointers to all three
    return refined


def _view_into(flat: Any, rows: np.ndarray) -> None:
    """Make ``flat``'s codes a view of ``rows``' bytes."""
    import faiss

    with tempfile.TemporaryDirectory(prefix="retrieval-view-") as scratch:
        path = os.path.join(scratch, "owner.faiss")
        tiny = faiss.IndexScalarQuantizer(1, faiss.ScalarQuantizer.QT_fp16)
        tiny.add(np.zeros((1, 1), np.float32))
        faiss.write_index(tiny, path)
        mapped: Any = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)  # its codes carry an owner handle we can pass on
        data = rows.reshape(-1).view(np.uint8)
        flat.codes = faiss.MaybeOwnedVectorUInt8.create_view(  # type: ignore[attr-defined]  # not in faiss's stubs
            faiss.swig_ptr(data), data.nbytes, mapped.codes.owner
        )
        flat.ntotal = len(rows)
