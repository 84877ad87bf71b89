#!/usr/bin/env bash
# GPU check of the query side: runs the tests that skip without a GPU, and the route and 16-thread
# tests with RETRIEVAL_TEST_DEVICE=cuda (encoders and exact search on CUDA); then the embedding
# throughput of issue 17 (benchmarks/gpu_pipeline.py, JSON in $OUT/gpu_pipeline.json). On a machine with no
# package registry, carry wheels of faiss-cpu, open_clip_torch, ftfy, wcwidth and the EfficientNet-Lite0
# packages in .whl/ and a copy of ../shared/data/coco-train-mini in .gpudata/ (both git-ignored).
#     bash benchmarks/gpu_tests.sh            # logs go to $OUT (or /tmp/gpu_tests)
set -uo pipefail
out=${OUT:-/tmp/gpu_tests}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ ! -d ../shared/data ] && [ -d .gpudata ]; then
    mkdir -p ../shared && ln -s "$PWD/.gpudata" ../shared/data
fi
nvidia-smi -L
python3 -c "import torch, faiss, open_clip; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'faiss', faiss.__version__, 'open_clip', open_clip.__version__)"
# CLIP indexes only: the ASIF cases need the MiniLM package (83 MB), too big to carry.
RETRIEVAL_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -rs tests/test_routes.py tests/test_concurrency.py \
    -k "not asif" 2>&1 | tee "$out/routes_threads_cuda.log"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_ann.py tests/test_encoders.py tests/test_gpu_decode.py -k "cuda or gpu" 2>&1 | tee "$out/gpu_only.log"
# Issue 17: end to end against the model alone, CPU and GPU decode, 20,000 photos (~4 min on an H200)
python3 benchmarks/gpu_pipeline.py --out "$out" 2>&1 | tail -n 120 | tee "$out/gpu_pipeline.log"
