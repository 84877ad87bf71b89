"""Export scikit-image's bundled sample photos and a caption file for the offline demo.

Usage: python examples/sample_photos.py OUT_DIR
Writes OUT_DIR/photos/*.png and OUT_DIR/captions.txt (captions written by hand
for these photos, plus a few that describe none of them).
"""

from __future__ import annotations

import sys
from pathlib import Path

PHOTOS = {
    "astronaut": "an astronaut in a white spacesuit in front of the American flag",
    "chelsea": "a ginger tabby cat resting and looking to the side",
    "coffee": "a cup of coffee with a saucer and a spoon",
    "rocket": "a rocket standing on the launch pad",
    "stereo_motorcycle": "a motorcycle parked indoors",
    "hubble_deep_field": "a telescope image of distant galaxies in deep space",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "coins": "a collection of old coins",
    "moon": "the cratered surface of the moon",
    "brick": "a close-up of a brick wall",
    "grass": "a close-up of green grass",
    "page": "a scanned page of printed text",
    "retina": "a medical photo of the retina of an eye",
}
EXTRA_CAPTIONS = [
    "a dog running on the beach",
    "a bowl of fresh fruit on a kitchen table",
    "a city street at night with cars",
]


def export(out: Path) -> None:
    """Write the photos and the caption file under ``out``."""
    from PIL import Image
    from skimage import data

    photos = out / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        pixels = getattr(data, name)()
        if isinstance(pixels, tuple):  # stereo pairs: keep the left view
            pixels = pixels[0]
        Image.fromarray(pixels).save(photos / f"{name}.png")
    lines = list(PHOTOS.values()) + EXTRA_CAPTIONS
    (out / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(PHOTOS)} photos to {photos} and {len(lines)} captions to {out / 'captions.txt'}")


if __name__ == "__main__":
    export(Path(sys.argv[1] if len(sys.argv) > 1 else "index_data/demo"))
