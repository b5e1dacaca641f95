# flan-squad: `make train` runs the offline smoke job, `make test` the test suite (both install first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# No hub here: fail fast instead of retrying for ~50 s. Data and tokenizer come from ../shared.
export HF_HUB_OFFLINE ?= 1
export FLAN_SQUAD_SHARED ?= $(abspath ../shared)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test train clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install --quiet --constraint constraints-cpu.txt --editable '.[dev]'
	touch $@

test: install
	$(PY) -m pytest tests

train: install
	$(PY) -m flan_squad.train experiment=smoke $(ARGS)

clean:
	rm -rf outputs/runs outputs/multiruns outputs/.cache .pytest_cache
