# flan-squad: `make train` runs the offline smoke job, `make test` the test suite, `make bench` the benchmarks,
# `make compare-cpu` the strategy comparison from a self-trained base (all install first; `make tracking` adds MLflow
# and W&B, `make serving` the HTTP server's FastAPI + uvicorn).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# No hub here: fail fast instead of retrying for ~50 s. Data and tokenizer come from ../shared.
export HF_HUB_OFFLINE ?= 1
export FLAN_SQUAD_SHARED ?= $(abspath ../shared)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install tracking serving shared lint test test-long test-fast test-slurm train bench parity gpu-check gpu-bundle gpu-rehearsal base-cpu compare-cpu compare-cpu-sweep clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install --quiet --constraint constraints-cpu.txt --editable '.[dev]'
	touch $@

# MLflow and W&B (logger=mlflow, logger=wandb, their tests): the `tracking` extra, kept out of the quick start (`make
# train`). Measured here: 22 s on top of `make install`'s venv for mlflow, 20 s more for wandb; mlflow alone in an
# empty venv, 2 min 48 s, 850 MB.
tracking: $(VENV)/.tracking

$(VENV)/.tracking: $(VENV)/.installed
	$(PY) -m pip install --quiet --constraint constraints-cpu.txt --editable '.[dev,tracking]'
	touch $@

# FastAPI + uvicorn (python -m flan_squad.serve, its tests): the `serve` extra (nothing more once mlflow is there).
serving: $(VENV)/.serving

$(VENV)/.serving: $(VENV)/.installed
	$(PY) -m pip install --quiet --constraint constraints-cpu.txt --editable '.[dev,serve]'
	touch $@

# Runs and tests read the SQuAD files and the FLAN-T5 tokenizer from FLAN_SQUAD_SHARED: check before installing.
shared:
	@test -d "$(FLAN_SQUAD_SHARED)/data/squad" || { echo "error: no shared data folder at $(FLAN_SQUAD_SHARED)" \
		"(SQuAD files + FLAN-T5 tokenizer): put it beside the checkout as ../shared, or set" \
		"FLAN_SQUAD_SHARED=/path/to/shared" >&2; exit 2; }

# ruff (pyproject.toml: pycodestyle, pyflakes, import order, pyupgrade, bugbear); CI runs it before the tests.
lint: install
	$(PY) -m ruff check .

# The suite, but for the longest end-to-end checks (marker `long`: 10 s to minutes each on 2 cores); CI runs both.
test: shared install tracking serving
	$(PY) -m pytest tests -m "not slurm and not long"

# The long end-to-end checks: every strategy and optimizer learns through the entry point, one run interrupted 8 times,
# DDP and FSDP on 2 processes, the sweeps resumed, the bench in miniature (.ci/run runs it after make test).
test-long: shared install tracking serving
	$(PY) -m pytest tests -m long

# The inner loop: everything but the tests that train through the entry point or start processes (marker `slow`).
test-fast: shared install tracking serving
	$(PY) -m pytest tests -m "not slurm and not slow and not long"

# Sweeps, a 2-task job and preemption on a one-node SLURM cluster, then a job over 2 nodes and its preemption on a
# two-node one (scripts/local_slurm.sh [--nodes 2] starts each here, as root; needs: apt-get install slurm-wlm slurmdbd
# mariadb-server iproute2). Skipped, naming what is missing, without SLURM.
test-slurm: shared install
	$(PY) -m pytest tests -m slurm

train: shared install
	$(PY) -m flan_squad.train experiment=smoke $(ARGS)

# Training/evaluation throughput, peak memory and MFU against the Seq2SeqTrainer pipeline (random-init
# weights, plus a model trained here that stops early): prints one table per precision (fp32, bf16), writes
# benchmarks/results/latest.json. ARGS="--quick" for a first look.
bench: shared install
	$(PY) -m benchmarks.bench $(ARGS)

# The Python that runs the GPU check: this one ($(PYTHON)) when it has torch (a CUDA container, the lent GPU machine's
# image: a venv would replace their CUDA build; the check names what else is missing), else the venv, built first.
GPU_PY := $(shell $(PYTHON) -c "import importlib.util as u; print(u.find_spec('torch') is not None)" 2>/dev/null)
GPU_PY := $(if $(filter True,$(GPU_PY)),$(PYTHON),$(PY))
# BUNDLE=gpu-bundle: the bundle's wheels (those this Python lacks) and data, instead of ../shared (docs/gpu.md).
BUNDLE ?=

# The GPU path in one go (scripts/gpu_check.py): every strategy, FSDP and DDP on one GPU, experiment=compare with
# QLoRA's memory against full fine-tuning's, the benchmarks; a few steps each, random weights, no hub. One table;
# exit 1 on a failure. Without CUDA its GPU-only step (FSDP) is skipped and the rest runs on the CPU (t5-tiny).
gpu-check: $(if $(BUNDLE),,shared) $(if $(filter $(PY),$(GPU_PY)),install)
	$(GPU_PY) scripts/gpu_check.py $(if $(BUNDLE),--bundle $(BUNDLE)) $(ARGS)

# What travels to a bare GPU machine beside the checkout (docs/gpu.md): the wheels its image lacks, a cut of the SQuAD
# files and the tokenizer, into gpu-bundle/; prints the size of checkout + bundle (the limit: 64 MiB).
gpu-bundle: shared install
	$(PY) scripts/gpu_bundle.py

# The GPU check's CPU steps on the GPU image's versions, before any GPU time is spent: a Python 3.12 venv with what the
# image has (requirements-gpu-image.txt; pip's torch 2.11.0 is the CUDA build, ~4 GB), plus only the bundle, installed
# by the check itself with --no-index. Not in `make test` (the venv alone is minutes of downloads).
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
REHEARSAL_VENV := .venv-gpu-image
REHEARSAL_PIP_ARGS ?=
$(REHEARSAL_VENV)/.installed: requirements-gpu-image.txt
	$(PYTHON312) -m venv $(REHEARSAL_VENV)
	$(REHEARSAL_VENV)/bin/python -m pip install --quiet $(REHEARSAL_PIP_ARGS) -r requirements-gpu-image.txt
	touch $@

gpu-rehearsal: gpu-bundle $(REHEARSAL_VENV)/.installed
	$(REHEARSAL_VENV)/bin/python scripts/gpu_check.py --bundle gpu-bundle --out outputs/gpu_rehearsal \
		--timeout-factor 10 $(ARGS)

# Learning parity (docs/learning.md, "Learning parity"): flan_squad.train against Seq2SeqTrainer set up as run_seq2seq_qa.py,
# on a SQuAD v2 task with decoy facts, same architecture (random init, trained here), budget and seeds; prints mean ± sd,
# writes benchmarks/results/parity.json. ARGS="--seeds 0,1 --jobs 2" for a first look, --help for the switches.
parity: shared install
	$(PY) -m benchmarks.parity $(ARGS)

# The CPU comparison with scores that mean something (docs/comparing.md): a T5 trained
# here from random weights (NOT FLAN-T5), its own score before fine-tuning, then full, LoRA and QLoRA fine-tuned from it
# (3 seeds each, at the lrs `compare-cpu-sweep` chose), the report, and what each strategy costs at flan-t5-base size
# (random init: cost only). Regenerates $(COMPARE_DOCS). COMPARE_DIR=... keeps the runs elsewhere; the base is built once.
BASE_CPU := outputs/bases/t5-mid-planted/model
COMPARE_DIR ?= outputs/multiruns/compare_cpu
COMPARE_SWEEP_DIR ?= outputs/multiruns/compare_cpu_sweep
COMPARE_DOCS ?= docs/compare_cpu
COST_ARGS ?= --models flan_t5_base
base-cpu: shared install
	test -f $(BASE_CPU)/config.json || $(PY) -m flan_squad.train experiment=base_cpu

# The machine, its load and the time, at the start and at the end (docs say which machine produced each table)
MACHINE_NOTE = { date -u; uptime; grep -m1 'model name' /proc/cpuinfo; nproc; \
	grep -m1 -o -w -E 'avx512_bf16|amx_bf16' /proc/cpuinfo || echo "no avx512_bf16/amx_bf16"; }
compare-cpu: base-cpu
	mkdir -p $(COMPARE_DOCS) && $(MACHINE_NOTE) > $(COMPARE_DOCS)/machine.txt
	$(PY) -m flan_squad.evaluate experiment=compare_cpu hydra.run.dir=$(COMPARE_DIR)/base
	$(PY) -m flan_squad.train experiment=compare_cpu hparams_search=strategies seed=0,1,2 hydra.sweep.dir=$(COMPARE_DIR) $(ARGS)
	$(PY) -m flan_squad.report $(COMPARE_DIR) --out $(COMPARE_DOCS)
	cp $(BASE_CPU)/../metrics.json $(COMPARE_DOCS)/base_metrics.json
	$(PY) -m benchmarks.strategy_cost $(COST_ARGS) --markdown $(COMPARE_DOCS)/cost.md
	$(MACHINE_NOTE) >> $(COMPARE_DOCS)/machine.txt

# The learning-rate sweep behind experiment=compare_cpu's `compare_lr`: each strategy at three rates, seed 0, validated
# once, at the end, on the tune split (never the reported one); the report goes to $(COMPARE_DOCS)/sweep.
SWEEP_LR_full ?= 1e-4,3e-4,1e-3
SWEEP_LR_lora ?= 3e-4,1e-3,3e-3
SWEEP_LR_qlora ?= 3e-4,1e-3,3e-3
compare-cpu-sweep: base-cpu
	$(foreach s,full lora qlora,$(PY) -m flan_squad.train -m experiment=compare_cpu dataset.val_split=tune seed=0 \
		strategy=$(s) strategy.lr=$(SWEEP_LR_$(s)) trainer.val_check_interval=1.0 ++trainer.check_val_every_n_epoch=2 \
		hydra.sweep.dir=$(COMPARE_SWEEP_DIR)/$(s) $(ARGS) &&) true
	$(PY) -m flan_squad.report $(COMPARE_SWEEP_DIR) --out $(COMPARE_DOCS)/sweep

clean:
	rm -rf outputs/runs outputs/multiruns outputs/.cache .pytest_cache
