# Two entry points for a fresh machine: `make demo` (set up + run the main job offline) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# img2dataset, the producer the shard/parquet tests run as users do, in a venv of its own: its
# dependencies (wandb, opencv, albumentations, pandas, webdataset<0.3) stay out of the project's
TOOLS ?= .venv-tools
IMG2DATASET := img2dataset==1.47.0
# torch from this pin installs from the local wheel cache on the project machines; elsewhere pip downloads it.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup setup-test demo test clean-demo

# What the demo needs: the package and its dependencies (+ scikit-image's sample photos).
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

# What the tests need on top: test extras, clip-retrieval's clients, img2dataset in its own venv.
setup-test: $(VENV)/.test-installed

$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	# clip-retrieval's ClipClient and clip-front are acceptance tests of `retrieval serve`; its own
	# dependencies (torch pins, flask, wandb, ...) are not needed for that, hence --no-deps
	$(PY) -m pip install --quiet --no-deps clip-retrieval==2.45.0
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet $(IMG2DATASET)
	touch $@

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/demo.sh

test: setup-test
	$(PY) -m pytest -q

clean-demo:
	rm -rf index_data/demo
