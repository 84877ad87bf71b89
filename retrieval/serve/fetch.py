"""Fetching ``image_url`` for clip-back queries, guarded against server-side request forgery.

Off unless the server runs with ``--allow-image-urls``. Only http and https; the host is resolved
once and every address it resolves to is checked (loopback, private, link-local, multicast, reserved
and unspecified addresses are refused unless ``--allow-private-urls``); the connection then goes to
a checked address, so a second DNS answer cannot redirect it. Redirects are not followed; the body
is read with a size limit and a deadline.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from retrieval.serve.errors import ApiError


@dataclass(frozen=True)
class FetchPolicy:
    allow: bool = False
    allow_private: bool = False
    timeout_s: float = 10.0
    max_bytes: int = 20 << 20


def is_public(address: str) -> bool:
    """Whether an IP address is a public unicast one (IPv4-mapped IPv6 addresses judged as their IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def resolve(host: str, port: int, allow_private: bool) -> str:
    """The first address of ``host``, after checking all of them."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as e:
        raise ApiError(422, f"image_url: cannot resolve host {host!r} ({e})") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise ApiError(422, f"image_url: host {host!r} has no address")
    if not allow_private:
        refused = [a for a in addresses if not is_public(a)]
        if refused:
            raise ApiError(
                403,
                f"image_url: host {host!r} resolves to a non-public address ({refused[0]}); "
                "this server refuses those unless its operator turns on `allow_private_urls`",
            )
    return addresses[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a fixed address, with the certificate checked against the URL's host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


def fetch_image_url(url: str, policy: FetchPolicy) -> bytes:
    """The bytes at ``url`` (an ApiError when the policy refuses it or the fetch fails)."""
    if not policy.allow:
        raise ApiError(403, "image_url is turned off on this server (its operator can turn on `allow_image_urls`)")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise ApiError(422, f"image_url: not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(422, "image_url must be an http:// or https:// URL with a host")
    address = resolve(parts.hostname, port, policy.allow_private)
    kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    connection = kind(parts.hostname, address, port, policy.timeout_s)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", path, headers={"User-Agent": "retrieval-serve", "Accept": "image/*"})
        return _read_body(connection.getresponse(), policy)
    except (OSError, http.client.HTTPException) as e:
        raise ApiError(422, f"image_url: fetch failed ({type(e).__name__}: {e})") from None
    finally:
        connection.close()


def _read_body(response: http.client.HTTPResponse, policy: FetchPolicy) -> bytes:
    if response.status != 200:
        raise ApiError(422, f"image_url: the server answered {response.status} (redirects are not followed)")
    deadline = time.monotonic() + policy.timeout_s
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = response.read(min(1 << 16, policy.max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > policy.max_bytes:
            raise ApiError(422, f"image_url: the image is larger than {policy.max_bytes} bytes")
        if time.monotonic() > deadline:
            raise ApiError(422, f"image_url: took longer than {policy.timeout_s} s")
