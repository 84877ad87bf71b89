"""Settings of one server: which indexes it serves and how it guards itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retrieval.core.errors import InputError

PAGE_DIR = Path(__file__).resolve().parent / "page"
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class ServeConfig:
    """What ``create_app`` needs: the served indexes ``[(name, path)]`` (the first is the default) and the guards.

    ``max_body_bytes`` caps request bodies (checked before they are read whole); ``max_k`` caps
    ``k`` / ``num_images`` / ``num_result_ids``; ``image_url_*`` bound the fetches of ``image_url``
    (off unless ``allow_image_urls``; loopback, private and link-local addresses refused unless
    ``allow_private_urls``); ``poll_s`` is how often a request may look at an index's manifest for
    a newer build; ``warm`` loads each build's encoders and vector indexes before it is served;
    ``search_threads`` is how many OpenMP threads the FAISS search of a vector or item query may use
    (concurrent requests are the parallelism; more threads per search spin and compete for the cores);
    ``freeze_gc``, for a server that owns its process (``retrieval serve``), moves everything loaded
    with each build out of the cyclic garbage collector's reach (``gc.freeze``): a full collection
    otherwise walks the ~0.5 M objects of models and item tables and stalls every request ~0.25 s.
    """

    indexes: list[tuple[str, Path]]
    api_key: str | None = None
    allow_image_urls: bool = False
    allow_private_urls: bool = False
    max_body_bytes: int = 32 << 20
    max_k: int = 1000
    page_dir: Path = PAGE_DIR
    device: str = "auto"
    image_url_timeout_s: float = 10.0
    image_url_max_bytes: int = 20 << 20
    poll_s: float = 1.0
    warm: bool = True
    thumbnail_cache_bytes: int = 64 << 20
    max_queries: int = 64
    search_threads: int = 1
    freeze_gc: bool = False
    ray: str | None = None  # sharded indexes: their shards searched by Ray actors (local, auto or an address)

    def __post_init__(self) -> None:
        if not self.indexes:
            raise InputError("serve at least one index (`ServeConfig.indexes` is empty)")
        names = [name for name, _ in self.indexes]
        if len(set(names)) != len(names):
            raise InputError(f"index names must differ, got {', '.join(names)}")
        for name in names:
            if not name or not set(name) <= NAME_CHARS:
                raise InputError(f"index name {name!r}: use letters, digits, '.', '_' or '-'")
        if self.max_body_bytes < 1024 or self.max_k < 1:
            raise InputError("`ServeConfig.max_body_bytes` must be at least 1024 and `ServeConfig.max_k` at least 1")
        if self.search_threads < 1:
            raise InputError(f"`ServeConfig.search_threads` must be at least 1, got {self.search_threads}")

    @property
    def default_index(self) -> str:
        return self.indexes[0][0]


def parse_index_arg(value: str) -> tuple[str, Path]:
    """``DIR`` or ``NAME=DIR`` (the name of a bare ``DIR`` is its folder name)."""
    name, sep, path = value.partition("=")
    if not sep or not name or "/" in name:
        path = value
        name = "".join(c if c in NAME_CHARS else "-" for c in Path(value).resolve().name) or "index"
    return name, Path(path)
