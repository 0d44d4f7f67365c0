# kiln: the two commands a newcomer runs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all lint demo clean

install: $(STAMP)

# torch is installed first and pinned to the CPU wheel that lies on disk; a bare `torch` requirement
# would otherwise pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	@# the C++ CPU ops (about a minute); without a compiler it says so in one line and kiln runs its torch paths
	$(BIN)/python -m kiln.kernels.cpu_extension || echo "kiln: C++ CPU ops not built; using the torch reference paths"
	touch $(STAMP)

# Tests use tiny models, where one intra-op thread is fastest; it also keeps the subprocesses the tests
# spawn (CLI runs, torchrun workers, a server) from oversubscribing a 2-core machine.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:logging -m "not slow and not gpu"

test-all: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:logging

lint: install
	$(BIN)/ruff check kiln tests
	$(BIN)/ruff format --check kiln tests

demo: install
	$(BIN)/kiln demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
