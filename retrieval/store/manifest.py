"""The manifest: the commit point of a directory. Reading it, checking its structure and its own digest."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from retrieval.core.errors import IndexFormatError
from retrieval.core.version import __version__
from retrieval.store.layout import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SAFE_PART_PATTERN,
)

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON, without its own ``manifest_sha256`` field."""
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def current_build_id(root: Path) -> Any:
    try:
        with open(root / MANIFEST_NAME, encoding="utf-8") as handle:
            return json.loads(handle.read(MAX_MANIFEST_BYTES)).get("build_id")
    except (OSError, ValueError, AttributeError):
        return None


def _check_rel(rel: object, path: Path) -> None:
    parts = rel.split("/") if isinstance(rel, str) else []
    if not parts or not all(SAFE_PART_PATTERN.match(part) and part not in (".", "..") for part in parts):
        raise IndexFormatError(f"{path}: names an unsafe file path {rel!r}; refused")


def _check_structure(manifest: dict[str, Any], path: Path) -> None:
    """The checksums are well formed, name only files inside the directory, and cover every file named."""
    checksums = manifest.get("checksums")
    if not isinstance(checksums, dict):
        raise IndexFormatError(f"{path}: no checksums; rebuild the index")
    for rel, meta in checksums.items():
        _check_rel(rel, path)
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("bytes"), int)
            or meta["bytes"] < 0
            or not isinstance(meta.get("sha256"), str)
            or not SHA256_PATTERN.match(meta["sha256"])
        ):
            raise IndexFormatError(f"{path}: bad checksum entry for {rel!r}")
    stack: list[Any] = [manifest.get("files", {}), manifest.get("errors_file")]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            if node not in checksums:
                raise IndexFormatError(f"{path}: names {node!r}, which has no checksum; rebuild the index")
        elif node is not None:
            raise IndexFormatError(f"{path}: bad entry {node!r} under 'files'")


def read_manifest(root: Path, kind: str) -> dict[str, Any]:
    """Read and check ``manifest.json`` of an index or anchor directory."""
    path = root / MANIFEST_NAME
    if not root.exists():
        raise IndexFormatError(f"{root}: no such {kind} directory")
    if not path.is_file():
        raise IndexFormatError(f"{root}: not a {kind} directory (no {MANIFEST_NAME}); build one first")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise IndexFormatError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{path}: manifest is not a JSON object")
    if manifest.get("format") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: {kind} format {manifest.get('format')!r}, but retrieval {__version__} reads format "
            f"{FORMAT_VERSION} only; upgrade retrieval to a version that reads it, or rebuild the {kind} with this one"
        )
    if manifest.get("kind") != kind:
        raise IndexFormatError(f"{path}: this is a {manifest.get('kind')!r} directory, expected {kind!r}")
    if "manifest_sha256" in manifest and manifest_digest(manifest) != manifest["manifest_sha256"]:
        raise IndexFormatError(
            f"{path}: the manifest does not match its own checksum (damaged or edited); rebuild the index"
        )
    _check_structure(manifest, path)
    return manifest
