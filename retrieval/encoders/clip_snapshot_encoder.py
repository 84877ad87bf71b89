"""An open_clip encoder read back from a query snapshot (see :mod:`.clip_snapshot`): torch only, no open_clip.

The towers are TorchScript modules; the tokenizer is open_clip's own ``tokenizer.py``, executed from
its file under a private module name, so the open_clip package (and with it torchvision and
transformers) is never imported. Its vectors are those of the encoder the snapshot was made from.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import (
    ImageEncoder,
    TextEncoder,
    check_pixels,
    encode_text_batches,
    inference_context,
    to_unit_numpy,
)
from .preprocess import FastImageTransform

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["META_NAME", "SNAPSHOT_VERSION", "TEXT_NAME", "VISUAL_NAME", "ClipSnapshotEncoder"]

SNAPSHOT_VERSION = 1
META_NAME = "snapshot.json"
TEXT_NAME = "text.pt"
VISUAL_NAME = "visual.pt"


class ClipSnapshotEncoder(ImageEncoder, TextEncoder):
    """Image and text towers of one open_clip model, traced; same spec, fingerprint and vectors as the original."""

    def __init__(self, folder: Path, meta: dict[str, Any], tokenizer: Callable, device: str = "cpu") -> None:
        self.spec = str(meta["spec"])
        self.dim = int(meta["dim"])
        self.device = device
        self.folder = folder
        self._meta = meta
        self._tokenizer = tokenizer
        self._transform = FastImageTransform.from_settings(meta["transform"])
        self._towers: dict[str, Any] = {}
        self._towers_lock = threading.Lock()

    @classmethod
    def read(cls, folder: Path) -> ClipSnapshotEncoder | None:
        """The snapshot in ``folder``, or None when there is none or it cannot be used here (logged)."""
        meta_file = folder / META_NAME
        if not meta_file.is_file():
            return None
        try:
            import torch

            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            if meta.get("version") != SNAPSHOT_VERSION or meta.get("torch") != torch.__version__:
                return None
            tokenizer = _simple_tokenizer(meta["tokenizer"])
            if tokenizer is None:
                return None
            snapshot = cls(folder, meta, tokenizer)
            snapshot.tower(TEXT_NAME)  # a damaged file shows now, not at the first query
            return snapshot
        except Exception as e:  # a damaged or foreign snapshot: load the model in full instead
            log.warning("ignoring query snapshot %s: %s", folder, e)
            return None

    def tower(self, name: str) -> Any:
        """The TorchScript tower in file ``name`` (TEXT_NAME or VISUAL_NAME), loaded on first use."""
        with self._towers_lock:
            if name not in self._towers:
                import torch

                self._towers[name] = torch.jit.load(str(self.folder / name), map_location="cpu").eval()
            return self._towers[name]

    def fingerprint(self) -> str:
        return str(self._meta["fingerprint"])

    @property
    def numerics(self) -> str:
        return str(self._meta["numerics"])

    @property
    def logit_scale(self) -> float:
        """The model's learned temperature, exp(logit_scale)."""
        return float(self._meta["logit_scale"])

    def image_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        return self._transform

    @property
    def draft_size(self) -> tuple[int, int] | None:
        return self._transform.draft_size

    def encode_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        check_pixels(pixels)
        with inference_context(self.device):
            return to_unit_numpy(self.tower(VISUAL_NAME)(pixels))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        def encode(chunk: list[str]) -> Any:
            with inference_context(self.device):
                return self.tower(TEXT_NAME)(self._tokenizer(chunk))

        return encode_text_batches(texts, self.dim, batch_size, progress, encode)


def _simple_tokenizer(settings: dict[str, Any]) -> Callable | None:
    """open_clip's SimpleTokenizer with ``settings``, built without importing the open_clip package."""
    module = _open_clip_tokenizer_module()
    if module is None:
        return None
    return module.SimpleTokenizer(context_length=int(settings["context_length"]), clean=str(settings["clean"]))


def _open_clip_tokenizer_module() -> ModuleType | None:
    """``open_clip/tokenizer.py`` run as a private module (it imports only ftfy, regex, numpy and torch).

    Reuses the real module where open_clip is already imported; None where open_clip is not installed.
    """
    loaded = sys.modules.get("open_clip.tokenizer")
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("open_clip")
    if package is None or not package.submodule_search_locations:
        return None
    path = Path(next(iter(package.submodule_search_locations))) / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("retrieval_snapshot_open_clip_tokenizer", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
