"""What an opened index holds and how it was built, for ``Index.info()`` and ``retrieval info``."""

from __future__ import annotations

from typing import Any

from retrieval.api.routes import QUERIES
from retrieval.asif.anchors import anchor_texts_of


def summarise(index: Any) -> dict[str, Any]:
    """A summary of ``index`` (an opened :class:`~retrieval.api.engine.Index`) for people and scripts."""
    m = index.manifest
    summary = {
        "path": str(index.path),
        "format": m["format"],
        "tool_version": m["tool"]["version"],
        "created": m["created"],
        "build_id": m["build_id"],
        "mode": m["mode"],
        "encoders": m["encoders"],
        "checkpoint": m.get("checkpoint"),
        "counts": m["counts"],
        "deleted": {kind: int(len(index.deleted(kind))) for kind in ("image", "caption")},
        "errors": m["errors"],
        "index": m["index"],
        "vector_indexes": describe_vector_indexes(m),
        "spaces": m["spaces"],
        "build": m["build"],
        "disk_bytes": index.store.disk_bytes(),
    }
    summary["routes"] = index.routes
    summary["query_routes"] = {query: index.routes_for(query) for query in QUERIES}
    if "anchors" in m:
        summary["anchors"] = [
            {"name": a["name"], "count": a["count"], "weight": a["weight"], "texts": anchor_texts_of(a)}
            for a in m["anchors"]
        ]
        summary["asif"] = m["asif"]
        summary["image_views"] = m.get("image_views", "none")
    return summary


def describe_vector_indexes(manifest: dict[str, Any]) -> dict[str, Any]:
    """Per vector index: what was built and why, and the recall and latency measured on this collection."""
    described = {}
    for key, record in (manifest.get("vector_indexes") or {}).items():
        choice, measured = record["choice"], record.get("measured") or {}
        described[key] = {
            "type": choice["spec"]["type"],
            "factory": choice["spec"]["factory"],
            "count": record["count"],
            "why": choice["reason"],
            "estimated_bytes": choice["estimated_bytes"],
            "knobs": measured.get("knobs", {}),
            "recall@1": measured.get("recall@1"),
            "recall@10": measured.get("recall@10"),
            "latency_ms_median": measured.get("latency_ms_median"),
            "recall_queries": measured.get("queries"),
            "query_source": measured.get("query_source"),
            "target_reached": measured.get("target_reached"),
        }
    return described
