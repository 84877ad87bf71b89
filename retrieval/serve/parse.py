"""Lenient, safe reading of JSON request fields: numbers may come as strings, ``""`` and null mean unset.

Every problem becomes an :class:`ApiError` (422) naming the field, never an exception the server did not expect.
"""

from __future__ import annotations

import json
import math
from typing import Any

from retrieval.serve.errors import ApiError

MAX_JSON_DEPTH = 64


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, whatever the Content-Type (clip-front sends text/plain, ClipClient nothing)."""
    if not body.strip():
        raise ApiError(400, "empty request body; send a JSON object")
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise ApiError(400, "request body nests too deep") from None
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"request body must be a JSON object, got {type(data).__name__}")
    return data


def unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def get_int(
    data: dict[str, Any], key: str, default: int | None, low: int | None = None, high: int | None = None
) -> int | None:
    """An integer field (``"12"`` accepted); ``low``/``high`` bound it (outside -> 422 naming the bounds)."""
    value = data.get(key)
    if unset(value):
        return default
    number = as_int(value, key)
    if low is not None and number < low:
        raise ApiError(422, f"{key} must be at least {low}, got {number}")
    if high is not None and number > high:
        raise ApiError(422, f"{key} must be at most {high}, got {number}")
    return number


def as_int(value: Any, what: str) -> int:
    """``value`` as an int: an integer, an integral float or a decimal string; bools and anything else -> 422."""
    if isinstance(value, bool):
        raise ApiError(422, f"{what} must be a whole number, got {json.dumps(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and len(value) <= 32:
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ApiError(422, f"{what} must be a whole number, got {_short(value)}")


def get_float(data: dict[str, Any], key: str) -> float | None:
    """A finite number field (``"0.5"`` accepted), or None when unset."""
    value = data.get(key)
    if unset(value):
        return None
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ApiError(422, f"{key} must be a number, got {_short(value)}")
    return number


def get_bool(data: dict[str, Any], key: str, default: bool) -> bool:
    """A boolean field; ``"true"``/``"false"``/``1``/``0`` accepted."""
    value = data.get(key)
    if unset(value):
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ApiError(422, f"{key} must be true or false, got {_short(value)}")


def get_str(data: dict[str, Any], key: str, max_chars: int | None = None) -> str | None:
    """A string field, or None when unset; another type -> 422."""
    value = data.get(key)
    if unset(value):
        return None
    if not isinstance(value, str):
        raise ApiError(422, f"{key} must be a string, got {type(value).__name__}")
    if max_chars is not None and len(value) > max_chars:
        raise ApiError(422, f"{key} is longer than {max_chars} characters")
    return value


def get_vector(value: Any, what: str, max_dim: int = 1 << 16) -> list[float]:
    """A non-empty list of finite numbers."""
    if not isinstance(value, list) or not value:
        raise ApiError(422, f"{what} must be a non-empty list of numbers")
    if len(value) > max_dim:
        raise ApiError(422, f"{what} has {len(value)} numbers, more than {max_dim}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value):
        raise ApiError(422, f"{what} must hold only finite numbers")
    return [float(x) for x in value]


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
