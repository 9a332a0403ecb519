# make demo | make test (test-cuda-emulated) | make bench | make gpu-check (gpu-build, gpu-test, gpu-sanitize, gpu-bench)
# demo, test and bench create .venv when missing, install the pinned dependencies
# (requirements.txt), build the extension (`pip install -e . --no-build-isolation`, which
# recompiles only what changed: objects stay in build/temp), then run.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NPROC := $(shell nproc 2>/dev/null || echo 2)
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') \
	setup.py pyproject.toml

export MAX_JOBS ?= $(NPROC)
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: demo test test-cuda-emulated test-cuda-emulated-models bench build gpu-check gpu-build gpu-test gpu-sanitize gpu-bench clean

demo: build
	$(PY) -m dlcv_fast demo

test: build
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-cuda-emulated

# The CUDA kernels run on the CPU (tests/cuda_emu.py) under the op tests, built with
# AddressSanitizer (an access outside a tensor or a __shared__ array fails the run), with
# each block's threads in order, then (float32 and float16 cases) in reverse order: a
# missing __syncthreads or __syncwarp fails one of the two. Needs the CUDA toolkit's
# headers (not a GPU), GCC's libasan and an x86-64 machine.
EMULATED_TESTS := tests/test_max_pool2d.py tests/test_conv2d.py tests/test_batch_norm.py \
	tests/test_attention.py tests/test_noise.py tests/test_scheduler_steps.py tests/test_func.py
ASAN_PRELOAD = $(shell c++ -print-file-name=libasan.so):$(shell c++ -print-file-name=libstdc++.so)
EMULATION = LD_PRELOAD=$(ASAN_PRELOAD) ASAN_OPTIONS=detect_leaks=0 \
	DLCV_FAST_EXTENSION=build/emu-asan/_C.so

EMULATION_ARCH := $(shell uname -m)

test-cuda-emulated: build
ifneq ($(EMULATION_ARCH),x86_64)
	@echo "test-cuda-emulated: skipped, the emulation's fiber switch is written for x86-64"
else ifdef CUDA_HOME
	$(EMULATION) $(PY) tests/cuda_emu.py --asan
	$(EMULATION) $(PY) -m pytest -q --capture=sys -m "not slow" $(EMULATED_TESTS)
	$(EMULATION) DLCV_FAST_EMU_SCHEDULE=reverse $(PY) -m pytest -q --capture=sys -m "not slow" \
		-k "float32 or float16" $(EMULATED_TESTS)
else
	@echo "test-cuda-emulated: skipped, no CUDA toolkit (set CUDA_HOME) for the kernels' headers"
endif

# Not in `make test` (8 minutes): the models, conversion and autocast tests on the emulated
# CUDA kernels, without AddressSanitizer.
test-cuda-emulated-models: build
ifneq ($(EMULATION_ARCH),x86_64)
	@echo "test-cuda-emulated-models: skipped, the emulation's fiber switch is written for x86-64"
else ifdef CUDA_HOME
	$(PY) tests/cuda_emu.py
	DLCV_FAST_EXTENSION=build/emu/_C.so $(PY) -m pytest -q -m "not slow" tests/test_models.py \
		tests/test_models_vit_googlenet.py tests/test_unet.py tests/test_convert.py \
		tests/test_autocast.py tests/test_autograd_fast_path.py
else
	@echo "test-cuda-emulated-models: skipped, no CUDA toolkit (set CUDA_HOME) for the kernels' headers"
endif

bench: build
	$(PY) -m dlcv_fast bench

build: $(VENV)/.built

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

# On a GPU machine whose Python already has torch, triton, pybind11 and ninja (no network):
# build in place with every core, run the whole test suite on the GPU, run
# compute-sanitizer (memcheck; initcheck: reads of unwritten memory) over the CUDA tests,
# then the benchmarks of the ops and of whole models (results in benchmarks/results/).
# Each step is also a target of its own (gpu-build, gpu-test, gpu-sanitize, gpu-bench), and
# gpu-bench takes OPS="conv2d batch_norm ..." to run some of the op benchmarks only. To split
# the tests into shorter runs, gpu-test and gpu-sanitize take TESTS="tests/test_conv2d.py ..."
# (default: every test file).
gpu-check: gpu-build gpu-test gpu-sanitize gpu-bench

TESTS ?= tests
SANITIZED_TESTS := $(if $(filter-out tests tests/,$(TESTS)),$(TESTS),tests/test_max_pool2d.py \
	tests/test_attention.py tests/test_conv2d.py tests/test_batch_norm.py)

gpu-build:
	MAX_JOBS=$(NPROC) $(PYTHON) setup.py build_ext --inplace

gpu-test: gpu-build
	$(PYTHON) -m pytest -q $(TESTS)

gpu-sanitize: gpu-build
	compute-sanitizer --tool memcheck --error-exitcode 1 \
		$(PYTHON) -m pytest -q -x -m "not slow" -k "cuda" $(TESTS)
	compute-sanitizer --tool initcheck --error-exitcode 1 \
		$(PYTHON) -m pytest -q -x -m "not slow" -k "cuda-cuda and float32" $(SANITIZED_TESTS)

gpu-bench: gpu-build
ifdef OPS
	$(PYTHON) -m dlcv_fast bench --op $(OPS) --save benchmarks/results
else
	$(PYTHON) -m dlcv_fast bench --save benchmarks/results
	$(PYTHON) -m dlcv_fast bench --op models --save benchmarks/results
endif

clean:
	rm -rf build dlcv_fast/_C*.so $(VENV)/.built
