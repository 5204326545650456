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
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_VERSION ?= 2.14.1
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: test bench install deps lint format clean cuda-check

$(PY):
	python3 -m venv $(VENV)

# numpy < 2.4: triton 3.6's interpreter (which runs the Triton kernels in CI; 3.6 is what the GPU
# machines' torch bundles) converts 1-element arrays to int, an error since numpy 2.4.
$(STAMP): | $(PY)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q scikit-build-core "numpy<2.4" pytest e3nn ruff clang-format matplotlib tqdm triton==3.6.0
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

# Proves that the CUDA sources compile and link against a CUDA build of torch (no GPU needed):
# a separate venv, so the CPU venv of `make test` is untouched. Run by .ci/run when nvcc is found.
cuda-check:
	test -x $(CUDA_VENV)/bin/python || python3 -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q torch==$(CUDA_TORCH_VERSION) scikit-build-core numpy cmake ninja
	PATH="$(abspath $(CUDA_VENV))/bin:$$PATH" EQUIKERN_CUDA=ON TORCH_CUDA_ARCH_LIST=9.0 \
	  $(CUDA_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -Cbuild-dir=build/cuda-check .
	cd /tmp && $(abspath $(CUDA_VENV))/bin/python -c "import torch, equikern; assert torch.version.cuda; \
	  assert torch._C._dispatch_has_kernel_for_dispatch_key('equikern::tensor_product', 'CUDA'); \
	  print('CUDA build of equikern imports with its CUDA kernels; torch', torch.__version__)"

clean:
	rm -rf build
