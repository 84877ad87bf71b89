#!/usr/bin/env bash
# The main job end to end, offline: index real photos and captions, then ask both ways.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO="${RETRIEVAL_DEMO_DIR:-index_data/demo}"  # where the photos, captions and index go
python examples/sample_photos.py "$DEMO"

echo; echo "== build-index (EfficientNet-Lite0 + MiniLM, ASIF over the built-in ImageNet anchors)"
retrieval build-index --images "$DEMO/photos" --captions "$DEMO/captions.txt" --index "$DEMO/index" \
    --image-encoder efficientnet-lite0 --text-encoder minilm --anchors builtin:imagenet

echo; echo "== retrieval text-to-image \"a cat\" -k 3"
retrieval text-to-image "a cat" --index "$DEMO/index" -k 3

echo; echo "== retrieval text-to-image \"a cup of espresso\" -k 3"
retrieval text-to-image "a cup of espresso" --index "$DEMO/index" -k 3

echo; echo "== retrieval image-to-caption $DEMO/photos/rocket.png -k 3"
retrieval image-to-caption "$DEMO/photos/rocket.png" --index "$DEMO/index" -k 3

echo; echo "== retrieval image-to-image $DEMO/photos/chelsea.png -k 3 --exclude-self  (more like this photo)"
retrieval image-to-image "$DEMO/photos/chelsea.png" --index "$DEMO/index" -k 3 --exclude-self

echo; echo "== retrieval text-to-caption \"a cat\" -k 3  (caption search)"
retrieval text-to-caption "a cat" --index "$DEMO/index" -k 3

echo; echo "== retrieval info"
retrieval info --index "$DEMO/index"
