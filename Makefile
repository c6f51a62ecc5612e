# Two commands do all the set-up on a fresh machine (each creates .venv and installs what it needs):
#   make demo   -- the main job on an embedded default (tiny synthetic model, CPU)
#   make test   -- the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= test,serving

.PHONY: demo test venv bench clean

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

# coverage: every line of the TRT-LLM adapter must run in CI (against the API double)
COV := --cov=trtllm_loop/trtllm/torch_backend --cov-report=term-missing --cov-fail-under=100

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider $(COV) $(PYTEST_ARGS)

bench: venv
	$(BIN)/python bench/bench_runtime.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
