# Two entry points for a fresh machine: `make demo` (set up + run the main job offline) and `make test`
# (lint, type check, then the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
# img2dataset, the producer the shard/parquet tests run as users do, in a venv of its own: its
# dependencies (wandb, opencv, albumentations, pandas, webdataset<0.3) stay out of the project's
TOOLS ?= .venv-tools
IMG2DATASET := img2dataset==1.47.0
TORCH := torch==2.14.1 torchvision==0.29.1
# Where torch and torchvision come from. Empty (default): PyPI, whose Linux x86_64 wheels are CUDA builds
# that pull about 3 GB of nvidia-* packages. For a CPU-only install (no NVIDIA GPU, or a smaller .venv):
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu     (the same for setup, setup-test, test)
# It applies when torch is installed, so on a fresh .venv: pip keeps an installed torch that matches the pin.
TORCH_INDEX ?=
TORCH_FROM := $(if $(strip $(TORCH_INDEX)),--index-url $(TORCH_INDEX))

.PHONY: setup setup-test demo lint test clean-demo

# What the demo needs: the package and its dependencies (+ scikit-image's sample photos).
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_FROM) $(TORCH)
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

# What the tests need on top: test and lint extras, clip-retrieval's clients, img2dataset in its own venv.
setup-test: $(VENV)/.test-installed

$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,lint]'
	# clip-retrieval's ClipClient and clip-front are acceptance tests of `retrieval serve`; its own
	# dependencies (torch pins, flask, wandb, ...) are not needed for that, hence --no-deps
	$(PY) -m pip install --quiet --no-deps clip-retrieval==2.45.0
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet $(IMG2DATASET)
	touch $@

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/demo.sh

# ruff (lint + format) and mypy at the versions the lint extra pins; settings in pyproject.toml.
# .pre-commit-config.yaml runs the same three before a commit.
lint: setup-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# lint first: a lint or type error fails `make test` (and so .ci/run) before the suite runs.
test: setup-test lint
	$(PY) -m pytest -q

clean-demo:
	rm -rf index_data/demo
