"""The one error type of the HTTP layer: a status and a one-line message, answered as ``{"error": message}``."""

from __future__ import annotations

import re

from retrieval.core.errors import RetrievalError

_NAMED = re.compile(r"`(?:SearchOptions\.|SearchKnobs\.)?([^`\n]+)`")  # `SearchOptions.min_score` -> min_score


class ApiError(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line ``message`` for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BodyTooLarge(ApiError):
    """The request body is over the configured limit (413), noticed before it is read whole."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


def refused(error: RetrievalError, index_path: object = None, index_name: str = "") -> ApiError:
    """A library error about the request as a 422 in the wire's words: the body's field names (``min_score``,
    not `SearchOptions.min_score`) and ``index NAME`` for the server's path of the index."""
    message = _NAMED.sub(lambda match: match[1], str(error))
    if index_path is not None:
        message = message.replace(str(index_path), f"index {index_name}")
    return ApiError(422, message)
