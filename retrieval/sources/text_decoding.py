"""Decoding caption files line by line, so one undecodable row is skipped instead of stopping a build.

A scraped caption file with a stray Latin-1 byte in one row of a million should lose that row, not the
build. A file that is evidently in another encoding (its header or first row fails, or more than one line and
more than 1% of lines fail) is still refused with a message that names the byte and suggests
another encoding.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.core.errors import InputError

MAX_BAD_LINE_FRACTION = 0.01


@dataclass(frozen=True)
class BadLine:
    """Where a physical line of a text file failed to decode."""

    line: int  # 1-based physical line
    byte: int  # offset of the first undecodable byte in the file
    reason: str

    def describe(self, encoding: str) -> str:
        """The skip reason written to errors.jsonl."""
        return f"cannot decode as {encoding} at byte {self.byte} (line {self.line}: {self.reason})"


@dataclass
class DecodedText:
    """A file's text; bytes of bad lines are kept as surrogate escapes and those lines listed."""

    text: str
    bad_lines: dict[int, BadLine] = field(default_factory=dict)

    def first_bad(self, first_line: int, last_line: int) -> BadLine | None:
        """The first bad line in ``first_line..last_line`` (inclusive), if any."""
        if not self.bad_lines:
            return None
        return next((self.bad_lines[n] for n in range(first_line, last_line + 1) if n in self.bad_lines), None)


def _codec(path: Path, encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise InputError(f"{path}: unknown encoding {encoding!r} (see `CaptionOptions.encoding`)") from None


def _ascii_compatible(codec: str) -> bool:
    """True when newlines are single ASCII bytes in this codec, so lines can be decoded one by one."""
    try:
        return "\n\r".encode(codec) == b"\n\r" and codecs.decode(b"a\n", codec) == "a\n"
    except (UnicodeError, LookupError):
        return False


def _refuse(path: Path, encoding: str, byte: int, reason: str, detail: str = "") -> InputError:
    return InputError(
        f"{path}: cannot decode as {encoding} at byte {byte} ({reason}){detail}; "
        "pass the right `CaptionOptions.encoding` (e.g. 'latin-1')"
    )


def _decode_by_line(data: bytes, codec: str, offset: int) -> tuple[list[str], dict[int, BadLine]]:
    """Decode line by line; ``offset`` is where ``data`` starts in the file (after a BOM)."""
    pieces: list[str] = []
    bad: dict[int, BadLine] = {}
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            pieces.append(raw.decode(codec))
        except UnicodeDecodeError as exc:
            bad[number] = BadLine(number, offset + exc.start, exc.reason)
            pieces.append(raw.decode(codec, "surrogateescape"))
        offset += len(raw)
    return pieces, bad


def decode_text(path: Path, encoding: str, header_lines: int = 0) -> DecodedText:
    """Read and decode a text file (a UTF-8 BOM stripped); a few bad lines are listed, not fatal.

    Refused as a whole: a file whose header or first row fails, or where more than one line and
    more than 1% of its lines fail.
    """
    codec = _codec(path, encoding)
    data = path.read_bytes()
    skipped = len(codecs.BOM_UTF8) if codec == "utf-8" and data.startswith(codecs.BOM_UTF8) else 0
    data = data[skipped:]
    try:
        return DecodedText(data.decode(codec))
    except UnicodeDecodeError as exc:
        if not _ascii_compatible(codec):
            raise _refuse(path, encoding, skipped + exc.start, exc.reason) from None
    pieces, bad = _decode_by_line(data, codec, skipped)
    content = [n for n, piece in enumerate(pieces, start=1) if piece.strip()]
    first = next((bad[n] for n in content[: header_lines + 1] if n in bad), None)
    if first is not None:
        raise _refuse(path, encoding, first.byte, first.reason, f" on line {first.line}, its first row") from None
    if len(bad) > 1 and len(bad) > MAX_BAD_LINE_FRACTION * len(content):
        where = min(bad.values(), key=lambda b: b.line)
        raise _refuse(
            path,
            encoding,
            where.byte,
            where.reason,
            f"; {len(bad)} of {len(content)} lines fail, so the file is not {encoding}",
        ) from None
    return DecodedText("".join(pieces), bad)
