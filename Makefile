# Two entry points, each doing its own set-up (a virtual environment with pinned versions):
#   make repro   install, then run the whole DVC pipeline on the embedded synthetic default
#   make test    install, then lint (ruff) and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install repro test dag clean-venv

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the pinned version (a CPU wheel where one is provided locally)
	$(PY) -m pip install -q -c requirements.lock torch
	$(PY) -m pip install -q -c requirements.lock -e ".[dev,kge]"
	touch $(STAMP)

install: $(STAMP)

repro: install
	dvc repro
	@$(PY) -c "import json; m = json.load(open('metrics/evaluate.json')); \
	print('test metrics (filtered, realistic):', {k: m[k] for k in ('mr', 'mrr', 'hits_at_1', 'hits_at_3', 'hits_at_10')})"

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

dag: install
	dvc dag

clean-venv:
	rm -rf $(VENV)
