"""A strategy that only strategies.py and conf/strategy/ know of, IA3 (the fourth, added as one class and one
YAML file), goes through train -> report -> export -> predict on the tiny model, as the first three do."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED, compose_config
from flan_squad.data.squad import read_squad_file
from flan_squad.export import export
from flan_squad.models.base import count_parameters
from flan_squad.predict import predict
from flan_squad.report import build_report
from flan_squad.runs.restore import load_run
from flan_squad.train import train

# A few questions, one epoch; a high lr, so that one step moves IA3's vectors (they start at 1) well away from
# the base: an export that dropped them would answer as the base does. fp32 (also where bf16 is native): the
# merged export computes W * l where the run computed (W x) * l, equal only up to bf16's rounding.
SETTINGS = ["experiment=smoke", "strategy=ia3", "strategy.lr=0.1", "dataset=squad_v1", "dataset.limit_train=16",
            "dataset.limit_val=8", "dataset.max_source_length=128", "eval.stride=32", "eval.max_new_tokens=6",
            "trainer.max_epochs=1", "callbacks=none", "logger=none", "trainer.precision=32-true"]


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["Where is the tower? The Eiffel Tower is in Paris."], return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch, labels=tokenizer(["Paris"], return_tensors="pt").input_ids).logits


@pytest.mark.long
def test_ia3_trains_reports_exports_and_predicts(tmp_path, cache_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    run_dir = tmp_path / "run"
    metrics = train(compose_config(SETTINGS, output_dir=run_dir, cache=cache_dir))
    assert metrics["strategy"] == "ia3" and metrics["approach"] == {"label": "ia3", "capacity": None}
    assert 0 < metrics["trainable_params"] < metrics["total_params"] / 1000  # a vector per adapted layer
    saved = load_file(run_dir / "model" / "adapter_model.safetensors")  # the run keeps what trained, only
    assert all("ia3_l" in name for name in saved)
    assert sum(t.numel() for t in saved.values()) == metrics["trainable_params"]

    _, settings, _ = build_report([str(run_dir)], tmp_path / "report")
    results = (tmp_path / "report" / "results.md").read_text().split("Memory account")[0]  # not the account's rows
    rows = [line.split(" | ") for line in results.splitlines() if line.startswith("| squad_v1")]
    assert [row[1] for row in rows] == ["ia3"] and rows[0][-1] == "ok |"

    exported = export(run_dir, tmp_path / "exported")
    files = {p.name for p in exported.iterdir()}
    assert "model.safetensors" in files and not any(name.startswith("adapter") for name in files)  # merged
    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(exported), AutoTokenizer.from_pretrained(exported)
    assert count_parameters(model)["total_params"] == metrics["total_params"] - metrics["trainable_params"]
    run = load_run(run_dir, torch.device("cpu"))
    assert torch.allclose(_logits(model, tokenizer), _logits(run.model, run.tokenizer), atol=1e-4)
    assert not torch.allclose(_logits(model, tokenizer), _logits(run.base.load(), tokenizer), atol=1e-2)

    predictions = json.loads((run_dir / "predictions.json").read_text())
    questions = [q for q in read_squad_file(SHARED / "data/squad/v1.1/dev-v1.1.json")[1] if q.id in predictions]
    input_file = tmp_path / "questions.json"
    input_file.write_text(json.dumps([{"id": q.id, "question": q.question, "context": q.context} for q in questions]))
    # asked in the format it was trained in, as the export records it (smoke's t5_tiny: t5)
    recorded = json.loads((exported / "flan_squad_export.json").read_text())
    prompt, no_answer = recorded["prompt"], recorded["no_answer"]
    assert (prompt, no_answer) == ("t5", "format")
    cfg = compose_config([f"model.name_or_path={exported}", "model.init=pretrained", "model.tokenizer=null",
                          f"model.prompt={prompt}", f"model.no_answer={no_answer}",
                          "dataset=squad_v1", f"input_file={input_file}", "dataset.max_source_length=128",
                          "eval.stride=32", "eval.max_new_tokens=6", "precision=32-true"], config_name="predict",
                         cache=cache_dir)
    assert predict(cfg) == predictions  # the plain export answers as the run did
