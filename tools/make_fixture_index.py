"""Write the committed fixture index (today's format) and the answers of a few queries beside it.

Usage: python tools/make_fixture_index.py [OUT_DIR]     (default: tests/fixtures)

``tests/test_fixture_index.py`` opens OUT_DIR/index with the code of its day and checks it gives
the answers in OUT_DIR/expected.json: an index written now must stay readable later (or be
refused with a message that says why). Rerun this script only when the format changes on purpose.

Offline and small (about 200 KB): six of scikit-image's sample photos shrunk to 64 pixels
(committed as OUT_DIR/photos, the image queries' files), EfficientNet-Lite0 + MiniLM (weights in
pip packages, checked by fingerprint when the index is opened) and an anchor set of sixteen
photo/caption pairs in place of builtin:imagenet (whose 1,000 anchors would copy 3 MB into the
index). Items are named relative to OUT_DIR (``photos/NAME.png``), so the index names no path of
the machine that wrote it.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from functools import partial
from pathlib import Path
from typing import Any

PHOTO_SIZE = 64
INDEX_PHOTOS = {
    "chelsea": "a ginger tabby cat resting and looking to the side",
    "coffee": "a cup of coffee with a saucer and a spoon",
    "rocket": "a rocket standing on the launch pad",
    "astronaut": "an astronaut in a white spacesuit",
    "moon": "the cratered surface of the moon",
    "coins": "a collection of old coins",
}
EXTRA_CAPTIONS = ["a dog running on the beach", "a city street at night with cars"]
ANCHOR_PHOTOS = {
    **INDEX_PHOTOS,
    "cat": "a cat looking at the camera",
    "camera": "a man with a camera on a tripod",
    "brick": "a brick wall",
    "grass": "green grass",
    "page": "a page of printed text",
    "retina": "a photo of the retina of an eye",
    "stereo_motorcycle": "a motorcycle parked indoors",
    "hubble_deep_field": "distant galaxies in deep space",
    "clock": "a clock on a wall",
    "colorwheel": "a wheel of colours",
}
ASIF_K = 8  # of sixteen anchors (the default k=100 needs a larger set)
ENCODERS = {"image": "efficientnet-lite0", "text": "minilm"}
QUERIES: list[dict[str, Any]] = [
    {"kind": "text_to_image", "query": "a cat", "route": None},
    {"kind": "text_to_image", "query": "a cup of coffee", "route": "projected"},
    {"kind": "image_to_caption", "query": "photos/rocket.png", "route": None},
    {"kind": "image_to_caption", "query": "photos/chelsea.png", "route": "projected"},
]
K = 3


def photo_png(name: str) -> bytes:
    """A scikit-image sample photo as RGB PNG bytes, shrunk so its longer side is PHOTO_SIZE."""
    import numpy as np
    from PIL import Image
    from skimage import data

    pixels = getattr(data, name)()
    if isinstance(pixels, tuple):  # stereo pairs: the left view
        pixels = pixels[0]
    image = Image.fromarray(np.asarray(pixels)).convert("RGB")
    image.thumbnail((PHOTO_SIZE, PHOTO_SIZE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def image_refs(folder: str, photos: dict[str, bytes]) -> list[Any]:
    """Items that read their bytes from memory and are named ``FOLDER/NAME.png`` in the index."""
    from retrieval.sources.items import ImageRef

    return [
        ImageRef(uri=f"{folder}/{name}.png", opener=partial(bytes, png), source=folder) for name, png in photos.items()
    ]


def anchor_set(image_encoder: Any, text_encoder: Any) -> Any:
    """Sixteen photo/caption pairs embedded as an ASIF anchor set named ``fixture-anchors``."""
    from retrieval.asif.anchors import AnchorSet
    from retrieval.asif.relative import AsifParams
    from retrieval.embed.pipeline import EmbedOptions, embed_images
    from retrieval.store.provenance import encoder_record

    refs = image_refs("anchors", {name: photo_png(name) for name in ANCHOR_PHOTOS})
    embedded = embed_images(refs, image_encoder, EmbedOptions(workers=0, progress=False))
    if len(embedded.rows) != len(refs):
        raise SystemExit(f"anchor photos skipped: {embedded.errors}")
    captions = list(ANCHOR_PHOTOS.values())
    return AnchorSet(
        name="fixture-anchors",
        image_vectors=embedded.vectors,
        text_vectors=text_encoder.encode_texts(captions),
        captions=captions,
        image_encoder=encoder_record(image_encoder),
        text_encoder=encoder_record(text_encoder),
        params=AsifParams(k=ASIF_K, p=2.0),
        uris=[ref.uri for ref in refs],
    )


def build(out: Path) -> None:
    """Write OUT/photos and OUT/index (replacing an old fixture index)."""
    from retrieval.api.build import Collection, embed_items
    from retrieval.api.write import WriteOptions, write_index
    from retrieval.asif.anchors import AnchorSpaces
    from retrieval.core.config import EncoderChoice
    from retrieval.embed.pipeline import EmbedOptions
    from retrieval.encoders.registry import load_encoders
    from retrieval.sources.items import CaptionRecord

    photos = {name: photo_png(name) for name in INDEX_PHOTOS}
    (out / "photos").mkdir(parents=True, exist_ok=True)
    for name, png in photos.items():
        (out / "photos" / f"{name}.png").write_bytes(png)
    captions = list(INDEX_PHOTOS.values()) + EXTRA_CAPTIONS
    collection = Collection(
        images=image_refs("photos", photos),
        captions=[CaptionRecord(text=text, source="captions.txt", row=row) for row, text in enumerate(captions)],
    )
    image_encoder, text_encoder = load_encoders(EncoderChoice(**ENCODERS, device="cpu"))
    embedded = embed_items(collection, image_encoder, text_encoder, EmbedOptions(workers=0, progress=False))
    shutil.rmtree(out / "index", ignore_errors=True)
    options = WriteOptions(
        anchors=AnchorSpaces([anchor_set(image_encoder, text_encoder)]),
        sources={"images": ["photos"], "captions": ["captions.txt"]},
        progress=False,
    )
    write_index(embedded, out / "index", options)


def ask(query: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """The hits of one of QUERIES, asked of ROOT/index through the ``retrieval`` command (``--json``) on the CPU;
    an image query names its file relative to ROOT."""
    from click.testing import CliRunner

    from retrieval.cli import main as cli

    argument = query["query"] if query["kind"] == "text_to_image" else str(root / query["query"])
    command = [query["kind"].replace("_", "-"), argument, "--index", str(root / "index"), "-k", str(K), "--json"]
    command += ["--device", "cpu", *(["--route", query["route"]] if query["route"] else [])]
    result = CliRunner().invoke(cli, command)
    if result.exit_code != 0:
        raise RuntimeError(f"retrieval {' '.join(command)} failed: {result.output}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def answers(out: Path) -> list[dict[str, Any]]:
    """QUERIES with their hits: id, uri (images) or caption, score."""
    results = []
    for query in QUERIES:
        label = "uri" if query["kind"] == "text_to_image" else "caption"
        hits = [{"id": hit["id"], label: hit[label], "score": round(hit["score"], 6)} for hit in ask(query, out)]
        results.append({**query, "k": K, "hits": hits})
    return results


def main(out: Path) -> None:
    build(out)
    expected = {"index": "index", "encoders": ENCODERS, "queries": answers(out)}
    (out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}/index, {out}/photos and {out}/expected.json ({size / 1024:.0f} KB in all)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"))
