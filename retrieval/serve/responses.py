"""The JSON response of every endpoint, and the error body ``{"error": "one-line message"}``."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response


class SafeJSON(Response):
    """JSON as UTF-8; text that UTF-8 cannot carry (lone surrogates of undecodable captions) is escaped instead."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return SafeJSON({"error": message}, status_code=status, headers=headers)
