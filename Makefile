# bnexp: every target sets itself up (creates .venv and installs bnexp into it when needed).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
S ?= demo
ARGS ?=

# `make studies`: every study in order at data=fashion_mnist scale=small (issue 26's re-runs; the
# plan and its measured minutes: docs/compute_plan.md, `make plan`). Resumes: finished runs are
# skipped, interrupted ones resume. One log per study in $(LOGS)/<study>.log, with its wall time.
STUDIES ?= demo norm_vs_noise bn_vs_dropout lr_sensitivity batch_size_regime batch_size batch_size_true \
           stat_modes_vs_batch noise noniid activations ema_vs_precise fusion finetune_source finetune \
           smoothness robustness affine
STUDY_ARGS ?= data=fashion_mnist scale=small launcher=joblib
DEMO_ARGS ?= launcher=joblib
RESULTS ?= results
# noniid's GN pair at fp32 (does reduced precision explain GN's class-sorted gap?), a sweep of its
# own that noniid's report reads; run before noniid's own sweep so that its analysis sees it.
# Empty it (NONIID_FP32=) to skip; its folder assumes the default STUDY_ARGS' data and scale.
NONIID_FP32 ?= norm=gn sampler=pk2x16g5,sorted16g10 seed=0,1,2,3,4 precision=fp32 \
               hydra.sweep.dir=$(RESULTS)/noniid/fashion_mnist-small-gn_fp32
LOGS ?= logs/studies

.PHONY: help setup test test-all data demo study studies plan smoke bench lint gpu-check site findings clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  make study S=<name> ARGS=\"data=synthetic scale=smoke\"   run a study's sweep, then its analysis"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# PIP_FIND_LINKS= : ignore a machine-local CPU-only torch wheel that cannot load torchvision
	PIP_FIND_LINKS= $(BIN)/pip install --quiet --upgrade pip
	PIP_FIND_LINKS= $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install bnexp with its test tools

test: $(STAMP)  ## run the fast test suite (CPU, synthetic data)
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: $(STAMP)  ## every test, the slow end-to-end studies included
	$(BIN)/python -m pytest -q -m "not gpu"

data: $(STAMP)  ## get Fashion-MNIST: torchvision download, else apt-get install dataset-fashion-mnist
	$(BIN)/python -m bnexp.data.files fetch fashion_mnist

demo: $(STAMP)  ## the quick tour on real Fashion-MNIST (fetched first): 30 runs, ~8 min on 2 cores, into results/scratch/demo/ beside the committed results/demo/
	@# get the data first (a no-op when it is here); when it cannot be had, demo.py falls back
	@# to the offline synthetic images and says so in the terminal and the report. Your runs go
	@# to the git-ignored results/scratch/ (the committed results/demo/ is the reference they are
	@# compared with; `make study S=demo` re-makes that)
	$(BIN)/python -m bnexp.data.files fetch fashion_mnist || true
	$(BIN)/python experiments/demo.py results_dir=results/scratch $(ARGS)

study: $(STAMP)  ## make study S=<name> ARGS="..."
	$(BIN)/python experiments/$(S).py $(ARGS)

studies: $(STAMP)  ## every study in order at scale=small, resuming; logs in logs/studies/ (docs/compute_plan.md)
	$(BIN)/python -m bnexp.data.files fetch fashion_mnist
	@mkdir -p $(LOGS)
	@# the demo pins data and scale itself and is run as `make demo` runs it (launcher=joblib
	@# only), so its folder names, and thus the skip of finished runs, match the reference's
	@set -e; for s in $(STUDIES); do \
	  echo "== $$s  (log: $(LOGS)/$$s.log)"; start=$$(date +%s); \
	  args="$(STUDY_ARGS)"; [ $$s = demo ] && args="$(DEMO_ARGS)"; \
	  echo "# $$(date -u +%FT%TZ) $(BIN)/python experiments/$$s.py $$args results_dir=$(RESULTS) $(ARGS)" >> $(LOGS)/$$s.log; \
	  if [ $$s = noniid ] && [ -n "$(NONIID_FP32)" ]; then \
	    $(BIN)/python -m bnexp -m study=noniid $$args $(NONIID_FP32) >> $(LOGS)/$$s.log 2>&1 \
	      || { echo "   noniid's fp32 GN pair failed: see $(LOGS)/$$s.log (re-run resumes)"; exit 1; }; \
	  fi; \
	  $(BIN)/python experiments/$$s.py $$args results_dir=$(RESULTS) $(ARGS) >> $(LOGS)/$$s.log 2>&1 \
	    || { echo "   $$s failed: see $(LOGS)/$$s.log (re-run resumes)"; exit 1; }; \
	  echo "# $$(date -u +%FT%TZ) $$s done in $$(( ($$(date +%s) - start) / 60 )) min" | tee -a $(LOGS)/$$s.log; \
	done

plan: $(STAMP)  ## the compute plan of `make studies`: runs x measured minutes per study
	$(BIN)/python tools/compute_plan.py

smoke: $(STAMP)  ## every study end to end at smoke scale on synthetic data
	$(BIN)/python -m pytest -q -m slow tests/test_studies.py

bench: $(STAMP)  ## throughput: naive PyTorch CIFAR script vs bnexp, batch 8/32/128
	$(BIN)/python -m bnexp.tools.bench

findings: $(STAMP)  ## results/README.md: the claims scorecard and one line per shape, from each study's verdicts.json
	$(BIN)/python -m bnexp.analysis.findings

site: $(STAMP)  ## site/index.html and one page per study (offline: no network at view time), from the committed results
	$(BIN)/python -m bnexp.analysis.site --results results --out site

lint: $(STAMP)  ## ruff, then import-linter (the package's import rules); both in pyproject.toml
	$(BIN)/ruff check .
	$(BIN)/lint-imports

gpu-check: $(STAMP)  ## on a CUDA machine: gpu tests, a 1-epoch CUDA run, the bench on CUDA (<= 5 min)
	PY=$(BIN)/python tools/gpu_check.sh

clean:  ## delete results/scratch: single runs, sweeps run without study_name=, your make demo (keeps .venv, named studies)
	rm -rf results/scratch
