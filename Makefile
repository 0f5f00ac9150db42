# Two commands for a newcomer (each installs what it needs first):
#   make demo   run the four methods on the shipped example bundle, write a latent h5ad
#               (runtime only, in .venv: numpy, scipy, anndata, onnxruntime; no torch)
#   make test   run the test suite (in a separate .venv-test with the export and test extras,
#               pinned by constraints.txt; the runtime's .venv stays torch-free)
PYTHON ?= python3
VENV ?= .venv
TEST_VENV ?= .venv-test
BIN := $(VENV)/bin
TBIN := $(TEST_VENV)/bin
# The extras the test environment installs (the optional features' tests need theirs).
TEST_EXTRAS ?= cpu,export,test

.PHONY: demo test lint kernel-builds bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(TBIN)/python:
	$(PYTHON) -m venv $(TEST_VENV)
	$(TBIN)/python -m pip install -q --upgrade pip

# Runtime only, CPU ONNX Runtime ("scvi-onnx[gpu]" for CUDA). No torch.
$(VENV)/.runtime-installed: pyproject.toml setup.py runtime/maths/_kernels.c | $(BIN)/python
	$(BIN)/pip install -q -e ".[cpu]"
	touch $@

# Export + test extras; constraints pin torch to the local CPU build and scvi-tools to 1.4.2.
$(TEST_VENV)/.test-installed: pyproject.toml setup.py constraints.txt runtime/maths/_kernels.c | $(TBIN)/python
	$(TBIN)/pip install -q -c constraints.txt -e ".[$(TEST_EXTRAS)]"
	touch $@

demo: $(VENV)/.runtime-installed
	PATH="$(BIN):$$PATH" bash scripts/demo.sh

test: $(TEST_VENV)/.test-installed
	$(TBIN)/python -m pytest -q

lint: $(TEST_VENV)/.test-installed
	$(TBIN)/ruff check runtime exporter tests scripts benchmarks
	$(TBIN)/ruff format --check runtime exporter tests scripts benchmarks

# The likelihood kernel built by clang and for aarch64 (run under qemu-user) against the
# installed one, bit for bit: installs the tools first (Debian / Ubuntu, as root), then runs
# the one test that uses them (it skips each build whose tools are missing).
kernel-builds: $(TEST_VENV)/.test-installed
	apt-get update -q
	apt-get install -y -q --no-install-recommends clang gcc-aarch64-linux-gnu \
		libc6-dev-arm64-cross qemu-user gcc-mingw-w64-x86-64 wine64
	$(TBIN)/python -m pytest -q -rs tests/runtime/maths/test_native.py \
		-k other_compilers_and_architectures

clean:
	rm -rf $(VENV) $(TEST_VENV) out .pytest_cache
