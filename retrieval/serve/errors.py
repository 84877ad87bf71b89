"""The one error type of the HTTP layer: a status and a one-line message, answered as ``{"error": message}``."""

from __future__ import annotations


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
