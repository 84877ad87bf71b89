"""Where a vector index is searched: FAISS on the CPU, FAISS on all GPUs, or exact torch float16 on a GPU."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from retrieval.index.source import VectorSource
from retrieval.index.spec import IndexSpec
from retrieval.index.torch_search import TorchFlatIndex, torch_cuda_available
from retrieval.index.vector_index import gpu_count, to_available_gpus

log = logging.getLogger(__name__)

GPU_TYPES = ("flat", "ivf", "ivfsq", "ivfpq")  # FAISS GPU has no HNSW: those stay on the CPU


def place_index(index: Any, spec: IndexSpec, device: str, load_vectors: Callable[[], VectorSource]) -> Any:
    """``index`` moved to where ``device`` (``auto``, ``cpu``, ``cuda``) says it should be searched.

    With faiss-gpu, FAISS indexes move to all GPUs (float16 storage). Without
    it, but with a CUDA device in torch, an exact (flat) index is searched as a
    float16 matrix product on the GPU (:class:`TorchFlatIndex`). Everything else
    stays on the CPU.
    """
    if device == "cpu":
        return index
    if gpu_count() and spec.type in GPU_TYPES:
        try:
            return to_available_gpus(index)
        except RuntimeError as e:  # e.g. an index layout FAISS GPU cannot clone: stay correct on the CPU
            log.warning(
                "cannot move the %s index to the GPU (%s); searching on the CPU", spec.type, str(e).splitlines()[0]
            )
            return index
    if spec.exact and torch_cuda_available():
        return TorchFlatIndex(load_vectors(), device="cuda" if device == "auto" else device)
    return index
