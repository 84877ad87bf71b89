"""Finding image files: folders, globs and single files as a user names them, and labelled folders (one sub-folder per
class)."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from retrieval.core.errors import InputError
from retrieval.sources.captions import check_unicode, render_template, template_fields
from retrieval.sources.images import LoadedImage, load_image, normalize_image  # noqa: F401  (re-exported)
from retrieval.sources.items import IMAGE_EXTENSIONS, CaptionRecord, ImageRef, ItemError

logger = logging.getLogger(__name__)


_GLOB_CHARS = frozenset("*?[")


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _has_glob(text: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in text)


def _walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden entries skipped, links to dirs not followed)."""

    def on_error(err: OSError) -> None:
        logger.warning("cannot list %s: %s", err.filename, err.strerror)

    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=on_error, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and _is_image_name(name):
                found.append(Path(dirpath, name))
    return sorted(found, key=lambda p: p.parts)


def _expand_glob(pattern: str) -> list[Path]:
    """Image files matched by a glob; matched folders are searched recursively."""
    found: list[Path] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_dir():
            found.extend(_walk_images(path))
        elif _is_image_name(match) and path.is_file():
            found.append(path)
    return found


def _images_for_arg(arg: str | Path) -> list[Path]:
    """Image paths for one user argument (file, folder or glob)."""
    text = str(arg)
    path = Path(arg).expanduser()
    if path.is_dir():
        images = _walk_images(path)
        if not images:
            raise InputError(f"{text}: folder contains no images ({_ext_list()})")
        return images
    if path.exists():
        if not _is_image_name(path.name):
            raise InputError(f"{text}: not an image file extension ({_ext_list()})")
        return [path]
    if _has_glob(text):
        images = _expand_glob(os.path.expanduser(text))
        if not images:
            raise InputError(f"{text}: pattern matches no images ({_ext_list()})")
        return sorted(images, key=lambda p: p.parts)
    raise InputError(f"{text}: no such file or directory")


def _ext_list() -> str:
    return "expected " + ", ".join(sorted(IMAGE_EXTENSIONS))


def _dedupe(refs: Iterable[ImageRef]) -> list[ImageRef]:
    """Keep the first ref for each resolved path."""
    seen: set[Path] = set()
    out: list[ImageRef] = []
    for ref in refs:
        if ref.path in seen:
            continue
        if ref.path is not None:
            seen.add(ref.path)
        out.append(ref)
    return out


def _resolve_existing(paths: Iterable[Path], skipped: list[ItemError] | None = None) -> Iterator[Path]:
    """Resolve paths, dropping broken links and other non-files (recorded in ``skipped`` when given)."""
    for path in paths:
        try:
            resolved = path.resolve()
            is_file = resolved.is_file()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            reason = f"cannot resolve the path ({exc})"
        else:
            if is_file:
                yield resolved
                continue
            reason = "not a regular file (broken or looping link?)"
        logger.warning("skipping %s: %s", path, reason)
        if skipped is not None:
            skipped.append(ItemError(path=str(path), reason=reason, kind="image"))


def discover_images(paths: Sequence[str | Path]) -> tuple[list[ImageRef], list[ItemError]]:
    """Like :func:`find_images`, also returning the entries skipped during discovery (broken or looping links)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    refs: list[ImageRef] = []
    skipped: list[ItemError] = []
    for arg in paths:
        found = list(_resolve_existing(_images_for_arg(arg), skipped))
        refs.extend(ImageRef(path=p, source=str(arg)) for p in found)
    return _dedupe(refs), skipped


def find_images(paths: Sequence[str | Path]) -> list[ImageRef]:
    """Image files from files, folders (recursive) and glob patterns, de-duplicated."""
    return discover_images(paths)[0]


def _label_dirs(root: Path) -> list[Path]:
    """Non-hidden first-level sub-folders of ``root``, sorted by name."""
    if not root.exists():
        raise InputError(f"{root}: no such directory")
    if not root.is_dir():
        raise InputError(f"{root}: not a directory (expected ROOT/<label>/<images>)")
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def labelled_folder_images(root: str | Path) -> list[ImageRef]:
    """Images under ``root/<label>/**`` with ``label`` set to the first-level folder name."""
    root_path = Path(root).expanduser()
    refs: list[ImageRef] = []
    for label_dir in _label_dirs(root_path):
        try:
            check_unicode(label_dir.name, "label folder name")
        except ValueError as exc:
            logger.warning("skipping %s: %s; rename the folder", label_dir, exc)
            continue
        found = _resolve_existing(_walk_images(label_dir))
        refs.extend(ImageRef(path=p, source=str(root), label=label_dir.name) for p in found)
    if not refs:
        raise InputError(f"{root}: no label sub-folders with images (expected ROOT/<label>/<image>, {_ext_list()})")
    return _dedupe(refs)


def labelled_folder_pairs(root: str | Path, template: str = "a photo of a {label}") -> list[CaptionRecord]:
    """One caption per image of a labelled folder, built from its label."""
    bad = [f for f in template_fields(template) if f != "label"]
    if bad:
        shown = ", ".join("{" + f + "}" for f in bad)
        raise InputError(f"template {template!r} uses {shown}; only {{label}} is available")
    source = str(Path(root).expanduser().absolute())
    records = []
    for row, ref in enumerate(labelled_folder_images(root), start=1):
        assert ref.label is not None
        text = render_template(template, {"label": ref.label.replace("_", " ")}, source).strip()
        records.append(CaptionRecord(text=text, source=source, row=row, image=ref.path, label=ref.label))
    return records
