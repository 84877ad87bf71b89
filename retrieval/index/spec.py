"""Which FAISS index to build: simple type names, factory strings, and ``auto`` under a memory budget.

The ``auto`` rules follow autofaiss's reasoning, simplified to the four types
this package builds and tunes:

- a small collection (fewer than ``AUTO_FLAT_BELOW`` vectors) is searched
  exactly: an exact scan of it already takes about a millisecond;
- otherwise an inverted file whose lists hold the float16 vectors
  (``IVF{nlist},SQfp16``) when they fit the budget: ``nlist`` ~ 4 sqrt(n),
  rounded to a power of two. The store keeps vectors in float16 anyway, so
  these lists lose nothing against them, take half the memory of IVF-Flat and
  scan about twice as fast (benchmarks/ANN.md);
- otherwise OPQ + IVF + PQ with the largest code size that fits, its shortlist
  re-ranked exactly from the float16 vectors kept on disk (memory-mapped, so
  they cost page cache, not the budget).

Estimates count what a search process holds: codes, 8-byte ids, centroids,
rotation and codebooks, and graph links.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from retrieval.core.errors import InputError
from retrieval.core.search import SearchKnobs as SearchKnobs  # defined in core, where queries take it

INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfsq", "ivfpq", "auto")
AUTO_FLAT_BELOW = 50_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
IVF_MIN_POINTS_PER_LIST = 39  # FAISS's own warning threshold for k-means
PQ_MIN_TRAINING = 256  # a PQ codebook has 256 centroids per sub-quantizer: FAISS needs at least that many points
TRAIN_POINTS_PER_LIST = 32  # k-means sample per centroid: training cost grows with it, quality barely does
MAX_TRAIN_SAMPLE = 262_144
MAX_NLIST = 8_192  # k-means cost on a CPU grows with nlist x sample; more lists are rarely worth it here
HNSW_QUANTIZER_FROM = 4_096  # above this many lists, assign vectors to lists through an HNSW graph
PQ_SIZES = (64, 32, 16, 8)
DEFAULT_RERANK_FACTOR = 10
DEFAULT_TARGET_RECALL = 0.95

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "t": 1 << 40,
    "tb": 1 << 40,
}


@dataclass(frozen=True)
class IndexSpec:
    """A FAISS index to build: its type, factory string and build parameters.

    ``type`` is ``flat``, ``hnsw``, ``ivf`` (IVF-Flat), ``ivfsq`` (IVF with
    float16 lists), ``ivfpq`` or ``factory`` (any other FAISS factory string,
    built as given and searched without tuning).
    ``rerank``: search a shortlist of ``k x rerank_factor`` in the index, then
    score it exactly with the stored float16 vectors.
    """

    type: str
    factory: str
    nlist: int | None = None
    hnsw_m: int | None = None
    pq_m: int | None = None
    rerank: bool = False
    train_size: int = 0

    @property
    def exact(self) -> bool:
        return self.type == "flat"

    @property
    def needs_training(self) -> bool:
        return self.nlist is not None or self.pq_m is not None

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IndexSpec:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


@dataclass(frozen=True)
class IndexChoice:
    """A chosen spec, why it was chosen, and its estimated search-time memory."""

    spec: IndexSpec
    reason: str
    estimated_bytes: int
    budget_bytes: int | None = None
    target_recall: float = DEFAULT_TARGET_RECALL
    alternatives: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_json(),
            "reason": self.reason,
            "estimated_bytes": self.estimated_bytes,
            "budget_bytes": self.budget_bytes,
            "target_recall": self.target_recall,
        }


def parse_memory(text: str | int | None) -> int | None:
    """Bytes from ``4GB``, ``512MB``, ``1.5g`` or a plain number; ``None`` stays ``None``."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or unit.endswith("ib"):
        raise InputError(f"cannot read memory size {text!r}; write e.g. 4GB, 512MB or 2000000000")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InputError(f"memory size must be positive, got {text!r}")
    return value


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: ~4 sqrt(n) as a power of two, with enough points per list to train."""
    wanted = 4 * math.sqrt(max(n, 1))
    nlist = 1 << max(0, round(math.log2(wanted)))
    while nlist > 1 and nlist * IVF_MIN_POINTS_PER_LIST > n:
        nlist //= 2
    return min(nlist, MAX_NLIST)


def train_size_for(nlist: int | None, n: int, pq: bool) -> int:
    """Vectors sampled for training (k-means of the lists, PQ codebooks): never the whole of a large collection."""
    wanted = TRAIN_POINTS_PER_LIST * (nlist or 1)
    if pq:
        wanted = max(wanted, 256 * 64)  # a PQ codebook has 256 centroids per sub-quantizer
    return min(n, max(wanted, 10_000), MAX_TRAIN_SAMPLE)


def _quantizer(nlist: int) -> str:
    return f"IVF{nlist}_HNSW{HNSW_M}" if nlist > HNSW_QUANTIZER_FROM else f"IVF{nlist}"


def spec_for(index_type: str, n: int, d: int, pq_m: int | None = None) -> IndexSpec:
    """The spec of a named type (or a FAISS factory string) for ``n`` vectors of dimension ``d``."""
    name = index_type.strip()
    lowered = name.lower()
    if lowered == "flat":
        return IndexSpec("flat", "Flat")
    if lowered == "hnsw":
        return IndexSpec("hnsw", f"HNSW{HNSW_M},Flat", hnsw_m=HNSW_M)
    if lowered in ("ivf", "ivfsq", "ivfpq"):
        if n < IVF_MIN_POINTS_PER_LIST * 2:
            raise InputError(
                f"index type {lowered!r} needs at least {IVF_MIN_POINTS_PER_LIST * 2} vectors to train, got {n}; use "
                "flat"
            )
        nlist = nlist_for(n)
        if lowered in ("ivf", "ivfsq"):
            lists = "Flat" if lowered == "ivf" else "SQfp16"
            return IndexSpec(
                lowered, f"{_quantizer(nlist)},{lists}", nlist=nlist, train_size=train_size_for(nlist, n, False)
            )
        m = pq_m or _largest_pq(d)
        if n < PQ_MIN_TRAINING:
            raise InputError(
                f"index type 'ivfpq' needs at least {PQ_MIN_TRAINING} vectors to train its codebooks, got {n}; use "
                "ivfsq or flat"
            )
        if d % m:
            raise InputError(f"PQ with {m} sub-quantizers needs a dimension divisible by {m}; the vectors have {d}")
        return IndexSpec(
            "ivfpq",
            f"OPQ{m},{_quantizer(nlist)},PQ{m}",
            nlist=nlist,
            pq_m=m,
            rerank=True,
            train_size=train_size_for(nlist, n, True),
        )
    if lowered == "auto":
        raise InputError("'auto' is resolved by choose_index(), not spec_for()")
    if not re.search(r"[A-Z]", name):
        raise InputError(
            f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)} or a FAISS factory string"
        )
    return IndexSpec("factory", name, train_size=min(n, MAX_TRAIN_SAMPLE))


def _largest_pq(d: int) -> int:
    for m in PQ_SIZES:
        if d % m == 0 and m <= d // 4:  # sub-vectors of at least 4 dimensions
            return m
    raise InputError(f"no PQ size in {PQ_SIZES} divides the dimension {d}; use ivf or hnsw")


def estimate_bytes(spec: IndexSpec, n: int, d: int) -> int:
    """Memory a search process needs for this index (data structures, not the Python process)."""
    ids = 8 * n
    lists = 0
    if spec.nlist:
        lists = spec.nlist * d * 4 + (spec.nlist * HNSW_M * 2 * 4 if spec.nlist > HNSW_QUANTIZER_FROM else 0)
    if spec.type == "flat":
        return n * d * 4
    if spec.type == "hnsw":
        return n * d * 4 + n * (spec.hnsw_m or HNSW_M) * 2 * 4 + n * 8
    if spec.type == "ivf":
        return n * d * 4 + ids + lists
    if spec.type == "ivfsq":
        return n * d * 2 + ids + lists
    if spec.type == "ivfpq":
        m = spec.pq_m or 64
        return n * m + ids + lists + d * d * 4 + 256 * d * 4
    return n * d * 4  # an arbitrary factory string: assume the worst, uncompressed


def choose_index(
    n: int, d: int, max_memory: int | None = None, target_recall: float = DEFAULT_TARGET_RECALL
) -> IndexChoice:
    """Pick the index type and parameters for ``n`` vectors of dimension ``d`` within ``max_memory`` bytes."""
    if not 0 < target_recall <= 1:
        raise InputError(f"target recall must be in (0, 1], got {target_recall}")
    budget = f"{_human(max_memory)} budget" if max_memory else "no memory budget"
    flat = spec_for("flat", n, d)
    flat_bytes = estimate_bytes(flat, n, d)

    def fits(need: int) -> bool:
        return max_memory is None or need <= max_memory

    if n < AUTO_FLAT_BELOW and fits(flat_bytes):
        why = f"{n} vectors: exact search is already fast ({_human(flat_bytes)}, {budget})"
        return IndexChoice(flat, why, flat_bytes, max_memory, target_recall)
    if n < IVF_MIN_POINTS_PER_LIST * 2:
        raise InputError(f"{n} vectors of dimension {d} need {_human(flat_bytes)} for exact search, over the {budget}")
    ivf = spec_for("ivfsq", n, d)
    ivf_bytes = estimate_bytes(ivf, n, d)
    if fits(ivf_bytes):
        why = (
            f"{n} vectors: IVF with {ivf.nlist} lists holding the float16 vectors ({_human(ivf_bytes)} within the "
            f"{budget}); "
            f"nprobe is tuned at build time to reach recall@10 >= {target_recall}"
        )
        return IndexChoice(ivf, why, ivf_bytes, max_memory, target_recall)
    tried = []
    for m in PQ_SIZES:
        if d % m or m > d // 4:
            continue
        pq = spec_for("ivfpq", n, d, pq_m=m)
        need = estimate_bytes(pq, n, d)
        if fits(need):
            why = (
                f"{n} vectors: IVF over float16 vectors needs {_human(ivf_bytes)}, over the {budget}; "
                f"OPQ+IVF{pq.nlist}+PQ{m} ({m} bytes per vector, {_human(need)}) with the shortlist re-ranked "
                f"exactly from the float16 vectors on disk; nprobe tuned for recall@10 >= {target_recall}"
            )
            return IndexChoice(pq, why, need, max_memory, target_recall)
        tried.append(f"PQ{m}: {_human(need)}")
    raise InputError(
        f"{n} vectors of dimension {d} do not fit the {budget}: "
        f"IVF over float16 vectors needs {_human(ivf_bytes)}, "
        f"{'; '.join(tried) or 'no PQ size divides the dimension'}; raise `IndexOptions.max_memory`"
    )


def _human(size: int | None) -> str:
    if size is None:
        return "unlimited"
    scaled = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if scaled < 1024:
            return f"{scaled:.0f} {unit}" if unit == "B" else f"{scaled:.1f} {unit}"
        scaled /= 1024
    return f"{scaled:.1f} TB"
