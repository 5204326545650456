# Two commands do all the set-up on a fresh machine:
#   make bench   build equikern from source and run the benchmark (python -m equikern.bench)
#   make test    build equikern from source, lint, and run the test suite
# Both create .venv (unless a virtual env is active) and install torch and the package into it.

TORCH_VERSION ?= 2.13.0
VENV ?= .venv
ifdef VIRTUAL_ENV
BIN := $(VIRTUAL_ENV)/bin
else
BIN := $(VENV)/bin
endif
PY := $(BIN)/python
STAMP := $(BIN)/../.equikern-deps
PIP := $(PY) -m pip
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: test bench install deps lint format clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): | $(PY)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q scikit-build-core numpy pytest e3nn ruff clang-format matplotlib tqdm
	touch $@

deps: $(STAMP)

install: deps
	$(PIP) install -q --no-build-isolation --no-deps .

lint: deps
	$(PY) -m ruff check python tests benchmarks examples
	$(PY) -m ruff format --check python tests benchmarks examples
	$(BIN)/clang-format --dry-run --Werror $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

format: deps
	$(PY) -m ruff check --fix python tests benchmarks examples
	$(PY) -m ruff format python tests benchmarks examples
	$(BIN)/clang-format -i $$(find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

test: install lint
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: install
	$(PY) -m equikern.bench $(BENCH_ARGS)

clean:
	rm -rf build
