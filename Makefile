# esam: make help lists every target. `make test` is what CI runs.
SHELL := /bin/bash
BOOTSTRAP_PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast bench

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_%-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP) ## Make .venv and install esam with its exact pins (no-op when done)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install ## SGD vs SAM vs ESAM on the embedded digits set (CPU, a few minutes), side-by-side table
	$(PYTHON) -m esam.demo $(ARGS)

test: install ## The whole test suite, slow tests included (what CI runs)
	$(PYTHON) -m pytest -q $(ARGS)

test-fast: install ## The test suite without tests marked slow
	$(PYTHON) -m pytest -q -m "not slow" $(ARGS)
