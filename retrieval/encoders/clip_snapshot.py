"""Query snapshots of open_clip encoders: a query process that never imports open_clip.

``import open_clip`` costs seconds on top of ``import torch`` (it imports torchvision, which imports
torch._dynamo, and transformers): more than a CLI query's whole budget. A snapshot holds
what a CPU query needs and nothing that imports open_clip to load:

* the text tower and the image tower traced to TorchScript, in float32; ``torch.jit.load`` needs only
  torch (``torch.export.load`` imports torch._dynamo, the cost this avoids). The image tower is the float
  one, not the int8 copy a CPU build embeds with: one query image gains nothing from int8, and
  TorchScript's int8 weights print a deprecation notice from C++ on every load. Its vectors agree
  with the int8 ones to cosine >= 0.999 (tests/test_clip_snapshot.py);
* the tokenizer's settings (open_clip's simple BPE tokenizer, see :mod:`.clip_snapshot_encoder`);
* the fast preprocessing's settings (:class:`~retrieval.encoders.preprocess.FastImageTransform`);
* the encoder's identity: spec, dim, weights fingerprint, numerics, logit scale.

The first load of a model writes one into ``<root>/<key>/``; later loads read it back. The key covers
the spec, the checkpoint files (resolved path, size, modification time of each), the torch version
and the device, so a changed checkpoint makes a new snapshot (and the index's fingerprint check then
sees the new weights). A snapshot is a shortcut only: where tracing, checking, saving or loading
fails, the full open_clip path is used. TorchScript is deprecated in torch 2.x but still shipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .clip_snapshot_encoder import (
    META_NAME,
    SNAPSHOT_VERSION,
    TEXT_NAME,
    VISUAL_NAME,
    ClipSnapshotEncoder,
)
from .open_clip_loading import LOCAL_DIR, PREFIX
from .preprocess import FastImageTransform

if TYPE_CHECKING:
    import torch

    from .open_clip import OpenClipEncoder

log = logging.getLogger(__name__)

__all__ = ["default_snapshot_root", "load_with_snapshot", "snapshot_key", "write_snapshot"]

CACHE_ENV = "RETRIEVAL_CACHE_DIR"
_TRACE_ATOL = 1e-4  # traced vs eager outputs on a batch size the trace did not see


def default_snapshot_root() -> Path:
    """``$RETRIEVAL_CACHE_DIR/clip-snapshots``, else ``$XDG_CACHE_HOME/retrieval/...``, else
    ``~/.cache/retrieval/...``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser() / "clip-snapshots"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "retrieval" / "clip-snapshots"


def snapshot_key(spec: str, checkpoint: str | Path | None, device: str) -> str:
    """24 hex chars naming the snapshot of ``spec`` + ``checkpoint`` on ``device`` (cheap: stats files only)."""
    import torch

    spec = spec.strip()
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    local = Path(body[len(LOCAL_DIR) :]) if body.startswith(LOCAL_DIR) else None
    identity = {
        "version": SNAPSHOT_VERSION,
        "spec": spec,
        "checkpoint": _files_identity(Path(checkpoint)) if checkpoint is not None else None,
        "local_dir": _files_identity(local) if local is not None else None,
        "torch": torch.__version__,
        "device": device,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _files_identity(path: Path) -> list[Any]:
    """(resolved path, then name/size/mtime of the file or of each file in the folder)."""
    path = path.expanduser().resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    return [str(path)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def load_with_snapshot(
    spec: str, checkpoint: str | Path | None, device: str, root: Path, load_full: Callable[[], OpenClipEncoder]
) -> ClipSnapshotEncoder | OpenClipEncoder:
    """The snapshot of ``spec`` under ``root`` if one is there; else ``load_full()``, snapshotted for next time.

    Snapshots are CPU-only (a GPU query process pays CUDA start-up anyway); other devices load in full.
    """
    if device != "cpu":
        return load_full()
    folder = root / snapshot_key(spec, checkpoint, device)
    snapshot = ClipSnapshotEncoder.read(folder)
    if snapshot is not None:
        return snapshot
    encoder = load_full()
    try:
        write_snapshot(encoder, folder)
    except Exception as e:  # a shortcut for next time only: never fail the load for it
        log.warning("could not write a query snapshot of %s to %s: %s", spec, folder, e)
    return encoder


def write_snapshot(encoder: OpenClipEncoder, folder: Path) -> bool:
    """Trace ``encoder`` into ``folder`` (atomically: a temporary folder renamed into place).

    Returns False, writing nothing, when the model has no exact snapshot (a tokenizer other than
    open_clip's default one, no fast preprocessing, or a trace that disagrees with the model).
    """
    tokenizer = _tokenizer_settings(encoder.tokenizer)
    transform = encoder.image_transform()
    if tokenizer is None or not isinstance(transform, FastImageTransform):
        log.info("no query snapshot for %s: tokenizer or preprocessing not supported", encoder.spec)
        return False
    import torch

    text, visual = _trace_towers(encoder, transform)
    if text is None or visual is None:
        log.info("no query snapshot for %s: the traced towers disagree with the model", encoder.spec)
        return False
    meta = {
        "version": SNAPSHOT_VERSION,
        "spec": encoder.spec,
        "dim": encoder.dim,
        "fingerprint": encoder.fingerprint(),
        "numerics": "fp32",
        "logit_scale": encoder.logit_scale,
        "tokenizer": tokenizer,
        "transform": transform.settings(),
        "torch": torch.__version__,
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        text.save(str(staging / TEXT_NAME))
        visual.save(str(staging / VISUAL_NAME))
        (staging / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _drop_stale(folder.parent, meta)
        os.rename(staging, folder)  # fails if another process got there first: its snapshot is as good
    except OSError:
        if not (folder / META_NAME).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def _drop_stale(root: Path, meta: dict[str, Any]) -> None:
    """Remove older snapshots of the same spec with other weights (a checkpoint rewritten in place)."""
    for meta_file in root.glob(f"*/{META_NAME}"):
        try:
            old = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if old.get("spec") == meta["spec"] and old.get("fingerprint") != meta["fingerprint"]:
            shutil.rmtree(meta_file.parent, ignore_errors=True)


def _tokenizer_settings(tokenizer: Any) -> dict[str, Any] | None:
    """The settings that rebuild ``tokenizer`` without open_clip, or None when it is not the default BPE one."""
    kind = type(tokenizer)
    if (kind.__module__, kind.__name__) != ("open_clip.tokenizer", "SimpleTokenizer"):
        return None
    if getattr(tokenizer, "reduction_fn", None) is not None:
        return None
    clean = getattr(getattr(tokenizer, "clean_fn", None), "__name__", "")
    if clean not in ("_clean_lower", "_clean_whitespace", "_clean_canonicalize"):
        return None
    if tokenizer.encoder != kind().encoder:  # a vocabulary or special tokens other than the default
        return None
    return {"context_length": int(tokenizer.context_length), "clean": clean[len("_clean_") :]}


def _trace_towers(encoder: OpenClipEncoder, transform: FastImageTransform) -> tuple[Any, Any]:
    """(text, image) towers traced to TorchScript, each None where it disagrees with the eager model."""
    import torch

    towers = encoder.float_towers()
    if towers is None:
        return None, None
    sample_tokens = encoder.tokenizer(["a photo", "two dogs running on a beach"])
    check_tokens = encoder.tokenizer(["x", "a red car", "the quick brown fox jumps"])
    size = transform.crop or transform.resize
    crop = size if isinstance(size, tuple) else (size, size)
    sample_pixels = torch.randn(2, 3, *crop, generator=torch.Generator().manual_seed(0))
    check_pixels = torch.randn(3, 3, *crop, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        text = _traced(towers[0], sample_tokens, check_tokens)
        visual = _traced(towers[1], sample_pixels, check_pixels)
    return text, visual


def _traced(module: torch.nn.Module, sample: torch.Tensor, check: torch.Tensor) -> Any:
    """``module`` traced on ``sample``; None unless it matches eager on ``check`` (another batch size)."""
    import torch

    traced = torch.jit.trace(module.eval(), sample, check_trace=False)
    if not torch.allclose(traced(check), module(check), atol=_TRACE_ATOL):
        return None
    return traced
