# Two commands do all the set-up on a fresh machine (each creates .venv and installs what it needs):
#   make demo   -- the main job on an embedded default (tiny synthetic model, CPU)
#   make test   -- the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= test,serving

.PHONY: demo test venv bench plugins clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: 2.13.0 is the CPU build on disk here; an unpinned torch would pull a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/trtllm-loop demo

# the gate plugin (plugins/loop_gate/README.md) into build/plugins: the PyTorch op for the venv's torch (CPU kernel;
# CUDA kernel with a CUDA torch) and, where nvcc and the TensorRT 10 headers are found, the TensorRT plugin for
# sm_90a, sm_100a, sm_120a, sm_121a + compute_90 PTX with its host test driver. No GPU or libnvinfer needed.
NVCC ?= $(or $(shell command -v nvcc 2>/dev/null),$(wildcard /usr/local/cuda/bin/nvcc))
TRT_HEADER := $(firstword $(wildcard $(if $(TensorRT_ROOT),$(TensorRT_ROOT)/include/NvInferRuntime.h) \
	../shared/reference/TensorRT/include/NvInferRuntime.h /usr/local/tensorrt/include/NvInferRuntime.h \
	/usr/include/x86_64-linux-gnu/NvInferRuntime.h /usr/include/aarch64-linux-gnu/NvInferRuntime.h))
PLUGIN_FLAGS := $(if $(and $(NVCC),$(TRT_HEADER)),-DLOOP_GATE_PLUGIN=ON -DCMAKE_CUDA_COMPILER=$(NVCC) \
	-DTensorRT_INCLUDE_DIR=$(abspath $(dir $(TRT_HEADER))),-DLOOP_GATE_PLUGIN=OFF)

plugins: venv
	@command -v cmake >/dev/null || { echo "make plugins: cmake not found (apt-get install cmake ninja-build)"; exit 1; }
	@[ -n "$(NVCC)" ] || echo "make plugins: nvcc not found, so no TensorRT plugin (the PyTorch op still builds). Install" \
		"the CUDA toolkit 12.9 or newer (sm_121a needs it): https://developer.nvidia.com/cuda-downloads, on" \
		"Debian/Ubuntu 'apt-get install cuda-toolkit-13-0' from NVIDIA's repository; then put nvcc on PATH or" \
		"run 'make plugins NVCC=/usr/local/cuda/bin/nvcc'"
	@[ -n "$(TRT_HEADER)" ] || echo "make plugins: TensorRT 10 headers (NvInferRuntime.h) not found, so no TensorRT" \
		"plugin: set TensorRT_ROOT (the TensorRT-LLM container has /usr/local/tensorrt) or put the NVIDIA/TensorRT" \
		"release headers at ../shared/reference/TensorRT/include"
	cmake -S plugins/loop_gate -B build/plugins $(if $(shell command -v ninja 2>/dev/null),-G Ninja) \
		-DLOOP_GATE_PYTHON=$(abspath $(BIN)/python) $(PLUGIN_FLAGS)
	cmake --build build/plugins

# coverage: every line of the TRT-LLM adapter must run in CI (against the API double)
COV := --cov=trtllm_loop/trtllm/torch_backend --cov-report=term-missing --cov-fail-under=100

test: venv plugins
	$(BIN)/python -m pytest -q -p no:cacheprovider $(COV) $(PYTEST_ARGS)

bench: venv
	$(BIN)/python bench/bench_runtime.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
