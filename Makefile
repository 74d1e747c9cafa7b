# One entry point for people and CI: `make run` and `make test` do all the set-up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3
FMNIST := /usr/share/datasets/fashion-mnist
SCENARIO ?= scenarios/quickstart.yaml
OUT ?= runs/quickstart

.PHONY: run test proto lint data install clean gpu-check gpu-pretrain

install: $(STAMP)

# torch/torchvision first, pinned: these exact versions come from the local wheel cache here.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

# Fashion-MNIST from Debian when we can install packages; otherwise the loader falls back to
# torchvision's download and, offline, says how to get the files.
data:
	@if [ -d $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null) || \
	  echo "note: could not install dataset-fashion-mnist; sparsat will try to download Fashion-MNIST"; \
	else echo "note: $(FMNIST) missing and apt-get unavailable; sparsat will try to download Fashion-MNIST"; fi

run: install data
	$(VENV)/bin/sparsat run $(SCENARIO) --out $(OUT)

# mypy checks the `sparsat` package through $(TYPECHECK)/sparsat, a link to this folder (the
# repository root is the package): imports of sparsat.* resolve to these files, not to Any.
TYPECHECK := $(VENV)/typecheck
MYPY := MYPYPATH=$(TYPECHECK) $(VENV)/bin/mypy -p sparsat.node -p sparsat.ground_station \
	-p sparsat.sim -p sparsat.proto -p sparsat.bench

$(TYPECHECK)/sparsat: | install
	mkdir -p $(TYPECHECK)
	ln -sfn $(CURDIR) $(TYPECHECK)/sparsat

test: install data $(TYPECHECK)/sparsat
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(MYPY)
	$(PY) -m pytest -q

# ---- GPU ----------------------------------------------------------------------------------------
# `make gpu-check`: on a CUDA machine, the GPU-marked tests, then the encoder bench (ViT-B/16 and
# the default encoder, visible-token encoding at r = 0, 0.5, 0.75, CUDA only) and the IST bench
# (trainer processes on CUDA, round wall time). Each bench's output goes to $(GPU_OUT)/NAME.log,
# its JSON line to $(GPU_OUT)/NAME.json; a summary is printed at the end.
# GPU_DEVICE=cpu: the same steps on the CPU (no CUDA needed; the GPU tests skip). GPU_SMOKE=1:
# the benches at their --smoke sizes (seconds). tests/test_bench_smoke.py runs this target with
# both in `make test` (GPU_TESTS: the test files to collect instead of all of tests/).
GPU_OUT ?= runs/gpu-check
GPU_DEVICE ?= cuda
GPU_SMOKE ?=
GPU_TESTS ?=
GPU_ENCODERS ?= mae_vit_base_patch16,vit_tiny_d8_patch4_28
GPU_BATCH ?= 32
GPU_REPEAT ?= 10
GPU_IST_CONFIGS ?= ist_k1_travel,ist_k2_reset,ist_k4_reset,local_sgd_k4_reset

gpu-check gpu-pretrain: SHELL := /bin/bash
gpu-check gpu-pretrain: .SHELLFLAGS := -o pipefail -c

gpu-check: install data
	@$(PY) bench/gpu_check.py require $(GPU_DEVICE)
	@mkdir -p $(GPU_OUT)
	$(PY) -m pytest -q -m gpu $(GPU_TESTS)
	$(PY) bench/encoder.py --devices $(GPU_DEVICE) --encoders $(GPU_ENCODERS) \
	    $(if $(GPU_SMOKE),--smoke,--batch $(GPU_BATCH) --repeat $(GPU_REPEAT)) | tee $(GPU_OUT)/encoder.log
	tail -n 1 $(GPU_OUT)/encoder.log > $(GPU_OUT)/encoder.json
	$(PY) bench/ist.py --device $(GPU_DEVICE) --configs $(GPU_IST_CONFIGS) $(if $(GPU_SMOKE),--smoke) \
	    | tee $(GPU_OUT)/ist.log
	tail -n 1 $(GPU_OUT)/ist.log > $(GPU_OUT)/ist.json
	@$(PY) bench/gpu_check.py summary $(GPU_OUT)

# `make gpu-pretrain`: the shipped default encoder's MAE pretraining (docs/pretraining.md: same
# data, model and settings, seed 10), longer, on CUDA; resumable (run it again to continue from
# $(PRETRAIN_OUT)/last.pt; PRETRAIN_STOP_AFTER=N stops after N epochs). Then the r = 0.5 probe of
# the new and the shipped checkpoint in the same run, and the adoption rule: adopt the new one
# only if its probe rises and it is at most 8 MiB (bench/gpu_check.py adopt; exit 1 = keep).
# PRETRAIN_DEVICE=cpu: the same steps on the CPU (tests/test_bench_smoke.py runs them with one
# epoch, PROBE_EPOCHS=2, on a tiny Fashion-MNIST in $$SPARSAT_DATA).
PRETRAIN_EPOCHS ?= 100
PRETRAIN_DEVICE ?= cuda
PROBE_EPOCHS ?= 10
PRETRAIN_OUT ?= runs/gpu-pretrain/d8-e$(PRETRAIN_EPOCHS)
PRETRAIN_STOP_AFTER ?=
SHIPPED_ENCODER ?= node/weights/vit_tiny_d8_patch4_28_fmnist_mae_e32.pt

gpu-pretrain: install data
	@$(PY) bench/gpu_check.py require $(PRETRAIN_DEVICE)
	$(VENV)/bin/sparsat pretrain --encoder vit_tiny_d8_patch4_28 --device $(PRETRAIN_DEVICE) \
	    --epochs $(PRETRAIN_EPOCHS) --seed 10 --out $(PRETRAIN_OUT) \
	    $(if $(PRETRAIN_STOP_AFTER),--stop-after $(PRETRAIN_STOP_AFTER))
	@test -f $(PRETRAIN_OUT)/encoder.pt || { echo "pretraining stopped early; run again to resume"; exit 0; }; \
	$(PY) bench/probe.py --weights $(PRETRAIN_OUT)/encoder.pt --pooling mean --epochs $(PROBE_EPOCHS) \
	    --ratios 0.5 | tee $(PRETRAIN_OUT)/probe.log && \
	$(PY) bench/probe.py --weights $(SHIPPED_ENCODER) --pooling mean --epochs $(PROBE_EPOCHS) \
	    --ratios 0.5 | tee $(PRETRAIN_OUT)/probe_shipped.log && \
	$(PY) bench/gpu_check.py adopt --new $(PRETRAIN_OUT)/probe.log \
	    --baseline $(PRETRAIN_OUT)/probe_shipped.log --checkpoint $(PRETRAIN_OUT)/encoder.pt

proto: install
	$(PY) -m sparsat.proto.codegen

lint: install $(TYPECHECK)/sparsat
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(MYPY)

clean:
	rm -rf $(VENV) runs .pytest_cache
