# flan-squad: `make train` runs the offline smoke job, `make test` the test suite, `make bench` the benchmarks,
# `make compare-cpu` the strategy comparison from a self-trained base (all install first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# No hub here: fail fast instead of retrying for ~50 s. Data and tokenizer come from ../shared.
export HF_HUB_OFFLINE ?= 1
export FLAN_SQUAD_SHARED ?= $(abspath ../shared)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install shared test train bench parity base-cpu compare-cpu clean

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

# Learning parity (README "Learning parity"): flan_squad.train against Seq2SeqTrainer set up as run_seq2seq_qa.py,
# on a SQuAD v2 task with decoy facts, same model (random init, trained here), budget and seeds; prints mean ± sd,
# writes benchmarks/results/parity.json. ARGS="--seeds 0,1 --jobs 2" for a first look, --help for the switches.
parity: shared install
	$(PY) -m benchmarks.parity $(ARGS)

# The CPU comparison with scores that mean something (README "Comparing strategies"): a small T5 trained here from
# random weights (NOT FLAN-T5), its own score before fine-tuning, then full, LoRA and QLoRA fine-tuned from it,
# and the report. COMPARE_DIR=... puts it elsewhere; the base is built once and reused.
BASE_CPU := outputs/bases/t5-mini-planted/model
COMPARE_DIR ?= outputs/multiruns/compare_cpu
base-cpu: shared install
	test -f $(BASE_CPU)/config.json || $(PY) -m flan_squad.train experiment=base_cpu

compare-cpu: base-cpu
	$(PY) -m flan_squad.evaluate experiment=compare_cpu hydra.mode=RUN hydra.run.dir=$(COMPARE_DIR)/base
	$(PY) -m flan_squad.train experiment=compare_cpu hydra.sweep.dir=$(COMPARE_DIR) $(ARGS)
	$(PY) -m flan_squad.report $(COMPARE_DIR)

clean:
	rm -rf outputs/runs outputs/multiruns outputs/.cache .pytest_cache
