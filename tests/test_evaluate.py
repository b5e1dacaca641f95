"""evaluate, predict and export round trips on one tiny LoRA run (SQuAD v2, contexts long enough for windows)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED, compose_config
from flan_squad.data.squad import read_squad_file
from flan_squad.evaluate import evaluate
from flan_squad.evaluation.inference import answer_questions
from flan_squad.evaluation.metrics import score
from flan_squad.export import export
from flan_squad.predict import predict
from flan_squad.report import build_report, table_rows
from flan_squad.runs.restore import RunError, load_run
from flan_squad.train import train
from flan_squad.utils.errors import ConfigError

# fp32 also where the CPU has native bf16: the round trips below compare answers across other batchings and
# against a merged export, equal in exact arithmetic; in bf16 the rounding depends on batch shapes.
SMALL = ["experiment=smoke", "dataset=squad_v2", "dataset.limit_val=8", "dataset.max_source_length=128",
         "eval.stride=32", "eval.max_new_tokens=6", "trainer.precision=32-true"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("lora_run")
    cfg = compose_config([*SMALL, "strategy=lora", "dataset.limit_train=8", "trainer.max_epochs=1", "logger=csv"],
                         output_dir=run_dir, cache=cache_dir)
    train(cfg)
    return run_dir


def test_training_writes_na_probs_and_threshold_metrics(lora_run):
    metrics = json.loads((lora_run / "metrics.json").read_text())
    na_probs = json.loads((lora_run / "na_probs.json").read_text())
    predictions = json.loads((lora_run / "predictions.json").read_text())
    assert set(na_probs) == set(predictions) and all(0.0 <= p <= 1.0 for p in na_probs.values())
    # The files are what was scored: the official v2 rules on them give metrics.json's figures, thresholds too.
    questions = [q for q in read_squad_file(SHARED / "data/squad/v2.0/dev-v2.0.reconstructed.json")[1]
                 if q.id in predictions]
    rescored = score("v2", questions, predictions, na_probs)
    assert {"best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh", "HasAns_f1", "NoAns_f1"} <= rescored.keys()
    assert {k: metrics[k] for k in rescored} == pytest.approx(rescored)
    assert metrics["multi_window_questions"] > 0 and metrics["val_windows"] > metrics["val_examples"]
    # "unanswerable" became "" (no answer); snapping only ever changes an answer that there is
    assert "unanswerable" not in {a.lower() for a in predictions.values()}
    assert 0 <= metrics["snapped_answers"] <= sum(1 for a in predictions.values() if a)


def test_evaluate_a_run_reproduces_its_validation(lora_run, tmp_path, cache_dir):
    cfg = compose_config([*SMALL, f"run_dir={lora_run}"], config_name="evaluate", output_dir=tmp_path, cache=cache_dir)
    metrics = evaluate(cfg)
    trained = json.loads((lora_run / "metrics.json").read_text())
    assert (json.loads((tmp_path / "predictions.json").read_text())
            == json.loads((lora_run / "predictions.json").read_text()))
    assert json.loads((tmp_path / "na_probs.json").read_text()) == pytest.approx(
        json.loads((lora_run / "na_probs.json").read_text()), rel=1e-4)
    for key in ("exact", "f1", "total", "HasAns_total", "NoAns_total", "multi_window_questions"):
        assert metrics[key] == trained[key], key
    assert metrics["strategy"] == "lora" and metrics["init"] == "random"
    assert (metrics["trainable_params"], metrics["lr"]) == (trained["trainable_params"], trained["lr"])  # as trained
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["evaluated"] == f"run {lora_run}" and on_disk["val_examples"] == 8


def test_evaluate_a_base_model_on_v1_without_windows(tmp_path, cache_dir):
    cfg = compose_config(["experiment=smoke", "dataset=squad_v1", "dataset.limit_val=4", "eval.stride=null",
                                     "dataset.max_source_length=64", "eval.max_new_tokens=4"], config_name="evaluate",
                        output_dir=tmp_path, cache=cache_dir)
    metrics = evaluate(cfg)
    assert metrics["evaluated"].startswith("base model t5-tiny") and metrics["total"] == 4
    assert metrics["multi_window_questions"] == 0 and metrics["val_truncated"] == 4
    assert not (tmp_path / "na_probs.json").exists() and "best_f1" not in metrics
    assert len(json.loads((tmp_path / "predictions.json").read_text())) == 4
    # The "before fine-tuning" row of a report: it trained nothing, at no learning rate.
    assert metrics["trainable_params"] is None and metrics["lr"] is None and metrics["total_params"] > 0
    # loaded as conf/evaluate.yaml's strategy loads a base (no pseudo-strategy): a name the contract knows
    assert metrics["strategy"] == "full" and metrics["approach"] == {"label": "base model, not fine-tuned",
                                                                     "capacity": None}
    _, settings, _ = build_report([str(tmp_path)], tmp_path / "report")
    header, rows = table_rows(settings)
    row = dict(zip(header, rows[0]))
    assert (row["approach"], row["lr"]) == ("base model, not fine-tuned", "–")
    assert row.get("trainable params", "–") == "–"  # a column no row fills is left out


def test_predict_from_a_run_matches_evaluation(lora_run, tmp_path, cache_dir):
    predictions = json.loads((lora_run / "predictions.json").read_text())
    questions = [q for q in read_squad_file(SHARED / "data/squad/v2.0/dev-v2.0.reconstructed.json")[1]
                 if q.id in predictions]
    input_file = tmp_path / "questions.jsonl"
    input_file.write_text("\n".join(json.dumps({"id": q.id, "question": q.question, "context": q.context})
                                    for q in questions), encoding="utf-8")
    cfg = compose_config([f"run_dir={lora_run}", f"input_file={input_file}", "dataset.max_source_length=128",
                          "eval.stride=32", "eval.max_new_tokens=6", "batch_size=3", "precision=32-true"],
                         config_name="predict", cache=cache_dir)
    assert predict(cfg) == predictions  # other batches, same answers


def test_beam_search_answers_in_training_validation_as_in_evaluate_and_predict(tmp_path, cache_dir):
    # eval.num_beams reaches every answering path: training's validation (its predictions.json), evaluate and predict
    # give the same answers. Whether beams find better answers is checked on a model that has learned something
    # (tests/test_own_data.py); num_beams=1 is greedy decoding as before (tests/test_regression.py pins it).
    run = tmp_path / "beams"
    trained = train(compose_config([*SMALL, "strategy=lora", "dataset.limit_train=8", "trainer.max_epochs=1",
                                    "eval.num_beams=3", "logger=none"], output_dir=run, cache=cache_dir))
    assert trained["num_beams"] == 3
    predictions = json.loads((run / "predictions.json").read_text())
    evaluated = evaluate(compose_config([*SMALL, f"run_dir={run}", "eval.num_beams=3"], config_name="evaluate",
                                        output_dir=tmp_path / "evaluated", cache=cache_dir))
    assert evaluated["num_beams"] == 3
    assert json.loads((tmp_path / "evaluated" / "predictions.json").read_text()) == predictions
    assert json.loads((tmp_path / "evaluated" / "na_probs.json").read_text()) == pytest.approx(
        json.loads((run / "na_probs.json").read_text()), rel=1e-4)
    questions = [q for q in read_squad_file(SHARED / "data/squad/v2.0/dev-v2.0.reconstructed.json")[1]
                 if q.id in predictions]
    input_file = tmp_path / "questions.jsonl"
    input_file.write_text("\n".join(json.dumps({"id": q.id, "question": q.question, "context": q.context})
                                    for q in questions), encoding="utf-8")
    assert predict(compose_config([f"run_dir={run}", f"input_file={input_file}", "dataset.max_source_length=128",
                                   "eval.stride=32", "eval.max_new_tokens=6", "eval.num_beams=3", "batch_size=3",
                                   "precision=32-true"], config_name="predict", cache=cache_dir)) == predictions


def test_predict_computes_in_evaluations_precision(tmp_path, cache_dir):
    # A random-init model's near-uniform logits flip greedy choices under any other rounding: predict matches
    # evaluate in bf16-mixed only if it computes in bf16 as Lightning does (and batches as evaluation does).
    settings = ["model=t5_tiny", "dataset=squad_v1", "dataset.max_source_length=96", "dataset.eval_batch_size=4",
                "eval.stride=32", "eval.max_new_tokens=8"]
    evaluated = evaluate(compose_config(
        [*settings, "dataset.limit_val=8", "trainer=cpu", "trainer.precision=bf16-mixed"],
        config_name="evaluate", output_dir=tmp_path, cache=cache_dir))
    assert evaluated["precision"] == "bf16-mixed"
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    questions = [q for q in read_squad_file(SHARED / "data/squad/v1.1/dev-v1.1.json")[1] if q.id in predictions]
    input_file = tmp_path / "questions.json"
    input_file.write_text(json.dumps([{"id": q.id, "question": q.question, "context": q.context} for q in questions]))
    cfg = compose_config([*settings, f"input_file={input_file}", "precision=bf16-mixed"], config_name="predict",
                         cache=cache_dir)
    assert predict(cfg) == predictions
    with pytest.raises(ConfigError, match="precision=16-mixed: T5's activations overflow fp16"):
        predict(compose_config([*settings, f"input_file={input_file}", "precision=16-mixed"], config_name="predict",
                               cache=cache_dir))


def test_export_round_trip_gives_the_runs_answers(lora_run, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = export(lora_run, tmp_path / "exported")
    assert not (out / "adapter_config.json").exists()
    exported = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    run = load_run(lora_run, torch.device("cpu"))
    questions = read_squad_file(SHARED / "data/squad/v2.0/dev-v2.0.reconstructed.json")[1][:6]
    ours = answer_questions(run.model, run.tokenizer, questions, "v2", 128, 32, 8, 6)
    theirs = answer_questions(exported, tokenizer, questions, "v2", 128, 32, 8, 6)
    assert ours.predictions == theirs.predictions
    assert list(ours.na_probs.values()) == pytest.approx(list(theirs.na_probs.values()), rel=1e-3, abs=1e-6)
    batch = tokenizer(["Where is it? It is in Paris."], return_tensors="pt")
    labels = tokenizer(["Paris"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(run.model(**batch, labels=labels).logits, exported(**batch, labels=labels).logits,
                              atol=1e-4)
    with pytest.raises(RunError, match="not empty"):
        export(lora_run, out)  # never overwrites


def test_predict_command_line_single_question(lora_run, tmp_path, monkeypatch, run_entry_point):
    monkeypatch.chdir(tmp_path)
    result = run_entry_point("flan_squad.predict", [f"run_dir={lora_run}", "question=Where is the tower?",
                                                    "context=The Eiffel Tower is in Paris.", "eval.max_new_tokens=4"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() and len(result.stdout.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written beside the caller
