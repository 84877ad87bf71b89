"""Exact search as a batched matrix product + top-k in torch: the GPU path when faiss has no GPU support.

The vectors live on the device in float16 (half the memory of FAISS's float32
flat index); scores are accumulated by the matmul kernel and returned as
float32. On a CPU (tests, or no CUDA) float32 is used, since half-precision
matmul is slow or missing there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUERY_BLOCK = 4096
ROW_BLOCK = 1 << 22  # rows scored per matmul: bounds the (queries x rows) score block on the device


def torch_cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class TorchFlatIndex:
    """A FAISS-like exact inner-product index (``d``, ``ntotal``, ``search``) on a torch device."""

    supports_selector = False  # deleted rows are filtered by the caller (over-fetch)

    def __init__(self, vectors: Any, device: str = "cuda", dtype: str | None = None) -> None:
        import torch

        self.device = torch.device(device)
        self.dtype = (
            getattr(torch, dtype) if dtype else (torch.float16 if self.device.type == "cuda" else torch.float32)
        )
        parts = vectors.parts if hasattr(vectors, "parts") else [vectors]
        blocks = [
            torch.as_tensor(np.ascontiguousarray(part)).to(self.device, self.dtype) for part in parts if len(part)
        ]
        self.d = int(parts[0].shape[1]) if parts else 0
        self.vectors = torch.cat(blocks) if blocks else torch.zeros((0, self.d), dtype=self.dtype, device=self.device)
        self.ntotal = int(self.vectors.shape[0])

    def search(
        self, queries: np.ndarray, k: int, params: Any = None, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows by inner product; (scores float32 (q, k), positions int64 (q, k)), like FAISS.

        ``allowed``: a bool mask over the rows; the others score -inf before the top-k (ask for at most
        as many rows as it allows).
        """
        import torch

        k = min(int(k), self.ntotal)
        mask = None if allowed is None else torch.as_tensor(np.asarray(allowed, bool)).to(self.device)
        out_scores, out_rows = [], []
        with torch.inference_mode():
            for start in range(0, len(queries), QUERY_BLOCK):
                block = torch.as_tensor(np.ascontiguousarray(queries[start : start + QUERY_BLOCK], dtype=np.float32))
                q = block.to(self.device, self.dtype)
                best_s: torch.Tensor | None = None
                best_i: torch.Tensor | None = None
                for row in range(0, self.ntotal, ROW_BLOCK):
                    scores = (q @ self.vectors[row : row + ROW_BLOCK].T).float()
                    if mask is not None:
                        scores.masked_fill_(~mask[row : row + ROW_BLOCK], float("-inf"))
                    s, i = torch.topk(scores, min(k, scores.shape[1]), dim=1)
                    i = i + row
                    if best_s is not None and best_i is not None:
                        s, pick = torch.topk(torch.cat([best_s, s], 1), k, dim=1)
                        i = torch.gather(torch.cat([best_i, i], 1), 1, pick)
                    best_s, best_i = s, i
                assert best_s is not None and best_i is not None  # ntotal > 0: at least one row block
                out_scores.append(best_s.cpu().numpy())
                out_rows.append(best_i.cpu().numpy().astype(np.int64))
        if not out_scores:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(out_scores).astype(np.float32), np.concatenate(out_rows)
