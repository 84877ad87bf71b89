"""Exceptions raised by the library; the CLI turns them into one-line messages."""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class for every error this package raises on purpose."""

    exit_code = 1


class InputError(RetrievalError):
    """A user-supplied path, file or option is missing, empty or malformed."""

    exit_code = 2


class ImageDecodeError(RetrievalError):
    """One image could not be decoded; builds skip it and record the reason."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class EncoderError(RetrievalError):
    """An encoder spec is unknown, or its weights cannot be loaded."""

    exit_code = 3


class IndexFormatError(RetrievalError):
    """An index or anchor directory is missing, incomplete or of another version."""

    exit_code = 4


class EncoderMismatchError(RetrievalError):
    """A query uses an encoder other than the one the index was built with."""

    exit_code = 5


class IndexLockedError(RetrievalError):
    """Another process is building the same index or anchor directory right now."""

    exit_code = 6
