"""A tiny seeded run, pinned (as torchtune's recipe tests pin loss values): full fine-tuning of the random-init
t5-tiny on planted_v1 in fp32, its training loss at a few steps and its validation F1 after each epoch.

Anything that changes what training computes (data sample or order, tokenization, the prompt, initial weights,
loss, optimizer, schedule, clipping, answer extraction, scoring) moves these numbers; a deliberate change must
re-measure them and say why in its commit. fp32 explicitly (`trainer.precision=32-true`): bf16-mixed would
be chosen where bf16 is native and not elsewhere. Measured on this project's machine (AMD EPYC with AVX512-BF16,
torch 2.13.0+cpu) with 1 and 2 threads, and with a CPU without AVX512-BF16 or AMX simulated (torch's and
bitsandbytes' probes made to return False, ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2): the losses of all
40 steps differed by at most 1e-6 across these, the F1s not at all. LOSS_TOLERANCE is 100x that spread; a real
change (another data order, lr or initialisation) moves the loss by 1e-2 or more.
"""

from __future__ import annotations

import csv

import pytest

from conftest import compose_config
from flan_squad.train import train

SETTINGS = ["experiment=learning_check", "model.prompt=flan", "strategy=full", "dataset=planted_v1",
            "dataset.limit_train=320", "dataset.limit_val=50", "trainer.max_epochs=2", "trainer.precision=32-true",
            "trainer.log_every_n_steps=1", "logger=csv", "callbacks=none"]
# optimizer step -> training loss (20 steps an epoch); validation F1 after each epoch (50 questions: 2 points each)
EXPECTED_LOSS = {0: 10.966602, 9: 5.989005, 19: 3.929667, 29: 2.855822, 39: 2.751623}
EXPECTED_F1 = {19: 6.0, 39: 8.0}
LOSS_TOLERANCE = 1e-4


def test_tiny_seeded_fp32_run_computes_the_pinned_numbers(tmp_path, cache_dir):
    metrics = train(compose_config(SETTINGS, output_dir=tmp_path, cache=cache_dir))
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    loss = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    f1 = {int(r["step"]): float(r["val/f1"]) for r in rows if r.get("val/f1")}
    assert metrics["precision"] == "32-true" and metrics["optimizer_steps"] == 40
    assert {step: loss[step] for step in EXPECTED_LOSS} == pytest.approx(EXPECTED_LOSS, abs=LOSS_TOLERANCE), loss
    assert f1 == EXPECTED_F1 and metrics["f1"] == max(EXPECTED_F1.values())
