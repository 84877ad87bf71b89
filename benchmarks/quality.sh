#!/usr/bin/env bash
# Reruns every number in benchmarks/RESULTS.md (quality of retrieval routes and anchor sets).
# Embeddings are cached in index_data/cache/embeddings: the first run encodes ~11,000 images
# (about 10 minutes on 2 cores), later runs take seconds per command.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
R="python cli.py"
ENC="--image-encoder efficientnet-lite0 --text-encoder minilm --quiet"
CACHE="--cache index_data/cache/embeddings"
run() { echo; echo "\$ $*"; "$@"; }

# anchor sets (none contains a COCO photo used for evaluation, except the COCO set, which is only used for CIFAR)
[ -f index_data/anchors/imagenet-photos/manifest.json ] || $R build-anchors --pairs "$DATA/imagenet-sample/labels.csv" \
    --image-column file --caption-template "a photo of a {class_name}" --out index_data/anchors/imagenet-photos $ENC $CACHE
[ -f index_data/anchors/coco/manifest.json ] || $R build-anchors --pairs "$DATA/coco-train-mini/captions.jsonl" \
    --out index_data/anchors/coco $ENC $CACHE

COCO="$DATA/coco-train-mini/captions.jsonl"
CIFAR="$DATA/cifar10-test/test"
PHOTOS=index_data/anchors/imagenet-photos
SWEEP="--sweep k=5,10,20,30,50,100,200,400,800 --sweep p=1,2,3,4,6,8"

echo "== COCO 80 photos / 400 captions: text -> image and image -> caption"
run $R eval "$COCO" $ENC $CACHE --anchors $PHOTOS --k 800 --p 8                       # plain paper recipe
run $R eval "$COCO" $ENC $CACHE --anchors $PHOTOS --route asif --route projected --route linear
run $R eval "$COCO" $ENC $CACHE --anchors builtin:imagenet-names --route asif --route projected --route linear
run $R eval "$COCO" $ENC $CACHE --anchors $PHOTOS --anchors builtin:imagenet-names --route asif --route projected
run $R eval "$COCO" $ENC $CACHE --anchors $PHOTOS --route asif $SWEEP --split | tail -3

echo "== CIFAR-10 zero-shot (10,000 test images), prompts 'a photo of a {label}', anchors: ImageNet sample photos + the 80 COCO photos"
ZS=(eval "$CIFAR" $ENC $CACHE --caption-template "a photo of a {label}" --anchors $PHOTOS --anchors index_data/anchors/coco)
run $R "${ZS[@]}" --k 800 --p 8 --limit 1000                                        # the plain paper recipe, 1,000-image subset
run $R "${ZS[@]}" --k 800 --p 8                                                     # the plain paper recipe, all images
run $R "${ZS[@]}" --route asif --route projected --route linear $SWEEP --split | tail -3          # tuned, inductive
run $R "${ZS[@]}" --route asif --route projected --center anchors $SWEEP --split | tail -3       # + centring on the anchors' means
run $R "${ZS[@]}" --route asif --route projected --center collection $SWEEP --split | tail -3    # + centring the images on their own mean
run $R "${ZS[@]}" --route projected --center collection --refine 0,2,4 --sweep k=10,20,50,100 --sweep p=1,2 --split | tail -3
run $R "${ZS[@]}" --route projected --center collection --refine 0,2,4 --sweep k=10,20,50,100 --sweep p=1,2 --split --limit 1000 | tail -3
