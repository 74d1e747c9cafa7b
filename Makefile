# One entry point for people and CI: `make run` and `make test` do all the set-up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3
FMNIST := /usr/share/datasets/fashion-mnist
SCENARIO ?= scenarios/quickstart.yaml
OUT ?= runs/quickstart

.PHONY: run test proto lint data install clean

install: $(STAMP)

# torch/torchvision first, pinned: these exact versions come from the local wheel cache here.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
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

test: install data
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy node ground_station sim bench
	$(PY) -m pytest -q

proto: install
	$(PY) proto/codegen.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy node ground_station sim bench

clean:
	rm -rf $(VENV) runs .pytest_cache
