# Two commands for a newcomer (each installs what it needs into .venv first):
#   make demo   run the four methods on the shipped example bundle, write a latent h5ad
#   make test   run the test suite (installs the export + test extras, pinned by constraints.txt)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime only: numpy, scipy, anndata, onnxruntime(-gpu). No torch.
$(VENV)/.runtime-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Export + test extras; constraints pin torch to the local CPU build and scvi-tools to 1.4.2.
$(VENV)/.test-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e ".[export,test]"
	touch $@ $(VENV)/.runtime-installed

demo: $(VENV)/.runtime-installed
	PATH="$(BIN):$$PATH" bash scripts/demo.sh

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.test-installed
	$(BIN)/ruff check runtime exporter tests scripts benchmarks
	$(BIN)/ruff format --check runtime exporter tests scripts benchmarks

clean:
	rm -rf $(VENV) out .pytest_cache
