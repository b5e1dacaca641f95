# flan-squad: `make train` runs the offline smoke job, `make test` the test suite, `make bench` the benchmarks
# (all install first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# No hub here: fail fast instead of retrying for ~50 s. Data and tokenizer come from ../shared.
export HF_HUB_OFFLINE ?= 1
export FLAN_SQUAD_SHARED ?= $(abspath ../shared)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install shared test train bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install --quiet --constraint constraints-cpu.txt --editable '.[dev]'
	touch $@

# Runs and tests read the SQuAD files and the FLAN-T5 tokenizer from FLAN_SQUAD_SHARED: check before installing.
shared:
	@test -d "$(FLAN_SQUAD_SHARED)/data/squad" || { echo "error: no shared data folder at $(FLAN_SQUAD_SHARED)" \
		"(SQuAD files + FLAN-T5 tokenizer): put it beside the checkout as ../shared, or set" \
		"FLAN_SQUAD_SHARED=/path/to/shared" >&2; exit 2; }

test: shared install
	$(PY) -m pytest tests

train: shared install
	$(PY) -m flan_squad.train experiment=smoke $(ARGS)

# Training/evaluation throughput, peak memory and MFU against the Seq2SeqTrainer pipeline (random-init
# weights, plus a model trained here that stops early): prints one table per precision (fp32, bf16), writes
# benchmarks/results/latest.json. ARGS="--quick" for a first look.
bench: shared install
	$(PY) -m benchmarks.bench $(ARGS)

clean:
	rm -rf outputs/runs outputs/multiruns outputs/.cache .pytest_cache
