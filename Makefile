# esam: make help lists every target. `make test` is what CI runs.
SHELL := /bin/bash
BOOTSTRAP_PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast bench bench-trainer models

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_%-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP) ## Make .venv and install esam with its exact pins (no-op when done)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install ## SGD vs SAM vs ESAM on the embedded digits set (CPU, minutes), side-by-side table; METHODS=sam,looksam,... (SGD always runs: the baseline), ARGS=settings
	$(PYTHON) -m esam.demo $(if $(METHODS),--methods=$(METHODS),) $(ARGS)

# -n 2: one pytest-xdist worker per core of the 2-core CI machine (TEST_WORKERS=0 runs in one process).
TEST_WORKERS ?= 2
test: install ## The whole test suite, slow tests included (what CI runs), on TEST_WORKERS=2 workers; the 15 slowest listed at the end
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) $(ARGS)

test-fast: install ## The suite without the tests marked slow (those that start a Python process); ARGS='-k name' etc.
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) -m "not slow" $(ARGS)

bench: install ## Side-by-side overhead benchmark on ResNet-18 into outputs/bench/<time>/ (ARGS=preset=quick: minutes on 2 CPU cores; ARGS='publish=true' writes results/bench/)
	$(PYTHON) -m esam.bench $(ARGS)

bench-trainer: install ## Trainer's SGD images/s vs the bench's bare SGD steps, interleaved (ARGS=--publish writes results/bench/)
	$(PYTHON) -m esam.bench.pipeline $(ARGS)

.PHONY: gpu-check gpu-wheels
gpu-check: ## CUDA tests, bench, trainer vs bench, 2-epoch runs on one GPU (scripts/gpu_check.sh; ARGS='--quick --wheels DIR' or --dry-run)
	bash scripts/gpu_check.sh $(ARGS)

gpu-wheels: install ## The wheels gpu-check needs on a GPU machine without Hydra, into DIR (default wheels/; ARGS=--from-installed offline)
	$(PYTHON) scripts/gpu_wheels.py $(or $(DIR),wheels) $(ARGS)

models: install ## Parameter counts and FLOPs of every model into results/models.md
	$(PYTHON) scripts/model_table.py --output results/models.md

# -- Paper recipes, sweeps and the report ----------------------------------------------------
# make cifar10-esam MODEL=wrn28_10 SEEDS=0,1,2 ARGS='hydra/launcher=slurm hydra.launcher.partition=gpu'
MODEL ?=
SEEDS ?= 0
RUNS ?= $(wildcard outputs multirun)
OUT ?= outputs/table
comma := ,
MULTIRUN = $(if $(findstring $(comma),$(SEEDS)),-m,)
STAMP_NOW := $(shell date +%Y-%m-%d_%H-%M-%S)
DIGITS_DIR ?= multirun/digits/$(STAMP_NOW)
.PHONY: sweep sweep-digits sweep-ablation table reproduce-digits

cifar10-%: install ## Paper recipe with method % (sgd, sam, esam or any registered method: looksam, msam, ...); MODEL=resnet18 (default)|wrn28_10|pyramidnet110, SEEDS=0,1,2, ARGS=overrides
	$(PYTHON) -m esam.train $(MULTIRUN) experiment=cifar10_$(or $(MODEL),resnet18)_$* seed=$(SEEDS) $(ARGS)

cifar100-%: install ## The same on CIFAR-100 (cifar100-<method>)
	$(PYTHON) -m esam.train $(MULTIRUN) experiment=cifar100_$(or $(MODEL),resnet18)_$* seed=$(SEEDS) $(ARGS)

imagenet-%: install ## ImageNet recipe with method % (any registered method); MODEL=resnet50 (default)|resnet101, ARGS='dataset.root=/data/imagenet'
	$(PYTHON) -m esam.train $(MULTIRUN) experiment=imagenet_$(or $(MODEL),resnet50)_$* seed=$(SEEDS) $(ARGS)

sweep: install ## The paper's CIFAR grid, 54 runs (conf/sweep/paper.yaml); ARGS='hydra/launcher=slurm ...'
	$(PYTHON) -m esam.train -m +sweep=paper $(ARGS)

sweep-digits: install ## SGD/SAM/ESAM x seeds 0,1,2 on digits, CPU, a few minutes (conf/sweep/digits.yaml)
	$(PYTHON) -m esam.train -m +sweep=digits $(ARGS)

sweep-ablation: install ## ESAM beta x gamma grid on CIFAR-10 ResNet-18 (conf/sweep/esam_ablation.yaml)
	$(PYTHON) -m esam.train -m +sweep=esam_ablation $(ARGS)

table: install ## Report of every run below RUNS (default: outputs multirun) into OUT (default: outputs/table; results/ only when asked); one row per configuration, a repeated seed counts once
	$(PYTHON) -m esam.report $(RUNS) --out $(OUT)

reproduce-digits: install ## The CPU reproduction in results/digits: digits sweep, then its report
	$(PYTHON) -m esam.train -m +sweep=digits hydra.sweep.dir=$(DIGITS_DIR) $(ARGS)
	$(PYTHON) -m esam.report $(DIGITS_DIR) --out results/digits

CPU_DIR ?= multirun/cpu_benchmark/$(STAMP_NOW)
.PHONY: reproduce-cpu
reproduce-cpu: install ## The CPU benchmark in results/cpu-benchmark (digits, 40% label noise): every method x 5 seeds at equal epochs and at 3 compute budgets, then the report (about an hour)
	$(PYTHON) -m esam.train -m +sweep=cpu_benchmark hydra.sweep.dir=$(CPU_DIR)/epochs $(ARGS)
	$(PYTHON) -m esam.train -m +sweep=cpu_benchmark optimizer=mesa optimizer.decay=0.9891 hydra.sweep.dir=$(CPU_DIR)/epochs_mesa $(ARGS)
	$(PYTHON) -m esam.train -m +sweep=cpu_benchmark_sgd_tuned hydra.sweep.dir=$(CPU_DIR)/sgd_tuned $(ARGS)
	$(PYTHON) -m esam.train -m +sweep=cpu_benchmark_budget hydra.sweep.dir=$(CPU_DIR)/budget $(ARGS)
	$(PYTHON) -m esam.train -m +sweep=cpu_benchmark_budget optimizer=mesa optimizer.decay=0.9891 hydra.sweep.dir=$(CPU_DIR)/budget_mesa $(ARGS)
	$(PYTHON) -m esam.train -m +sweep=cpu_benchmark_sgd_tuned trainer.budget=10,20,40 hydra.sweep.dir=$(CPU_DIR)/budget_sgd_tuned $(ARGS)
	$(PYTHON) -m esam.report $(CPU_DIR) --out results/cpu-benchmark

# -- The leaderboard (issue 21; results/leaderboard/README.md) ---------------------------------
SUITE ?= cpu
.PHONY: leaderboard
leaderboard: install ## Equal-tuning leaderboard: every method x workload, 8 quasi-random trials, best by validation x 5 seeds, then results/leaderboard/ (resumable; SUITE=cifar for GPU/Slurm)
	OMP_NUM_THREADS=1 $(PYTHON) -m esam.leaderboard --suite $(SUITE) $(ARGS)
