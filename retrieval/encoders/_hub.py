"""Cheap checks about the Hugging Face Hub so offline loads fail in milliseconds, not after retries."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_PROXY_VARS = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
)


def hub_unreachable_reason() -> str | None:
    """Why the hub certainly can't be reached now, or None when it might be.

    Looks at offline mode (HF_HUB_OFFLINE) and does one DNS lookup of the hub host; behind a
    proxy it returns None and leaves the decision to the real request. Without this, an offline
    machine waits ~50 s in huggingface_hub's retry loop before it reports the failure.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        return "huggingface_hub is not installed"
    is_offline = getattr(constants, "is_offline_mode", None)
    if is_offline() if callable(is_offline) else getattr(constants, "HF_HUB_OFFLINE", False):
        return "offline mode is on (HF_HUB_OFFLINE)"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"cannot resolve {host}: {e.strerror or e}"
    except OSError:
        return None
    return None


def cached_hub_file(repo_id: str, filenames: list[str], cache_dir: str | None = None) -> str | None:
    """Path of the first of ``filenames`` already in the local hub cache for ``repo_id``, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in filenames:
        try:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        except ValueError:  # malformed repo id (HFValidationError): treat as not cached
            return None
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None
