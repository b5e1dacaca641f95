"""Your own data end to end (docs/data.md): a CSV file with its own column names and an explicit no-answer column
trains (and learns), is evaluated, scored and answered through `python -m flan_squad.train / evaluate / score /
predict` (run in this process: conftest.run_module), and the same files load as a dataset with a config name
through `datasets.load_dataset`, as a hub dataset would.

The data is the learning check's planted SQuAD v2 task (facts planted in real SQuAD contexts, a quarter of the
questions unanswerable) written as a user's CSV, so that the run can be seen to learn from it: the learning check's
own thresholds for full fine-tuning on planted_v2 after 2 epochs (tests/test_learning.py) apply. The model it
trains also answers by beam search here (eval.num_beams): a random-init model's answers would not show whether beams
find better ones.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import SHARED, compose_config, run_module
from test_records import hub_dir

RENAMED = {"id": "qid", "context": "passage", "question": "query", "answer": "gold", "answer_start": "gold_start",
           "no_answer": "unanswerable"}
COLUMNS = [f"dataset.columns.{field}={name}" for field, name in RENAMED.items()]
RECORDS = ["dataset=records", "dataset.version=v2", *COLUMNS]


def _write_csv(path: Path, questions) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["qid", "passage", "query", "gold", "gold_start", "unanswerable"])
        for q in questions:
            writer.writerow([q.id, q.context, q.question, q.answers[0] if q.answers else "",
                             q.answer_starts[0] if q.answers else "", "false" if q.answers else "true"])
    return path


@pytest.fixture(scope="module")
def csv_files(tmp_path_factory) -> dict[str, Path]:
    from flan_squad.data import planted
    from flan_squad.data.squad import read_squad_file

    source = planted.build(tmp_path_factory.mktemp("planted"), SHARED) / "v2"
    root = tmp_path_factory.mktemp("mydata")
    files = {"train": _write_csv(root / "train.csv", read_squad_file(source / "train.json")[1]),
             "validation": _write_csv(root / "dev.csv", read_squad_file(source / "dev.json")[1][:100])}
    hub_dir(root, {"renamed": {"train": "train.csv", "validation": "dev.csv"}})  # the same files as a dataset
    return files


@pytest.fixture(scope="module")
def csv_run(csv_files, tmp_path_factory, cache_dir) -> Path:
    """`python -m flan_squad.train` on the CSVs: the learning check's settings (t5-tiny from random weights, 1,000
    questions, validation after each epoch), 2 epochs, full fine-tuning; fp32 everywhere, so that answers compare
    across batchings and decoders whatever the CPU."""
    run = tmp_path_factory.mktemp("csv_run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        code = run_module(monkeypatch, "flan_squad.train", [
            "experiment=learning_check", "strategy=full", *RECORDS, f"dataset.train_file={csv_files['train']}",
            f"dataset.validation_file={csv_files['validation']}", "dataset.limit_val=null", "trainer.max_epochs=2",
            "logger=csv", "callbacks=none", "trainer.precision=32-true", f"hydra.run.dir={run}",
            f"paths.cache_dir={cache_dir}"])
    assert code == 0
    return run


@pytest.mark.long
def test_a_csv_with_its_own_columns_trains_scores_and_predicts(csv_files, csv_run, tmp_path, cache_dir,
                                                               run_entry_point):
    run, common = csv_run, [f"paths.cache_dir={cache_dir}", "trainer.precision=32-true"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["dataset"], metrics["squad_version"], metrics["train_examples"], metrics["val_examples"]) == (
        "records", "v2", 1000, 100)
    with open(run / "csv" / "metrics.csv", newline="") as f:
        assert len([row for row in csv.DictReader(f) if row.get("val/f1")]) == 2  # validated after each epoch
    # It learned from the CSV's answers and no-answer flags (untrained: 0 and 0; tests/test_learning.py)
    assert metrics["HasAns_f1"] >= 30 and metrics["NoAns_f1"] >= 25, metrics

    # evaluate on the CSV, and on the same files loaded as a dataset with a config name: the run's scores
    for name, data in (("csv", [f"dataset.validation_file={csv_files['validation']}"]),
                       ("hub", ["dataset.validation_file=null", f"dataset.hub_id={csv_files['validation'].parent}",
                                "dataset.hub_config=renamed"])):
        evaluated = run_entry_point("flan_squad.evaluate", ["experiment=learning_check", f"run_dir={run}", *RECORDS,
                                                            *data, f"hydra.run.dir={tmp_path / name}", *common])
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        scores = json.loads((tmp_path / name / "metrics.json").read_text())
        assert {k: scores[k] for k in ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "total")} == pytest.approx(
            {k: metrics[k] for k in ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "total")}), name

    # score: the run's predictions against the CSV, as the official script scores SQuAD JSON
    scored = run_entry_point("flan_squad.score", [
        str(csv_files["validation"]), str(run / "predictions.json"), "--version", "v2",
        "--na-prob-file", str(run / "na_probs.json"), *[f"--column={f}={n}" for f, n in RENAMED.items()]])
    assert scored.returncode == 0, scored.stderr
    official = json.loads(scored.stdout)
    assert (official["exact"], official["f1"], official["best_f1"]) == pytest.approx(
        (metrics["exact"], metrics["f1"], metrics["best_f1"]))

    # predict: the CSV's questions (its answers unused) get the answers validation gave, under the CSV's ids
    answers = tmp_path / "answers.json"
    predicted = run_entry_point("flan_squad.predict", [
        f"run_dir={run}", f"input_file={csv_files['validation']}", f"output_file={answers}", *RECORDS,
        "eval.max_new_tokens=4", "batch_size=50", "precision=32-true"])  # the learning check's generation length
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert json.loads(answers.read_text()) == json.loads((run / "predictions.json").read_text())


@pytest.mark.long
def test_beam_search_finds_answers_at_least_as_likely_as_greedy_ones_and_predicts_as_it_scores(
        csv_files, csv_run, tmp_path, cache_dir, run_entry_point):
    from flan_squad.evaluate import validate

    evaluate = ["experiment=learning_check", f"run_dir={csv_run}", *RECORDS, "trainer.precision=32-true",
                f"dataset.validation_file={csv_files['validation']}"]
    greedy, beam = (validate(compose_config([*evaluate, f"eval.num_beams={n}"], config_name="evaluate",
                                            output_dir=tmp_path / str(n), cache=cache_dir), progress_bar=False)
                    for n in (1, 3))
    assert greedy.module.predictions == json.loads((csv_run / "predictions.json").read_text())  # num_beams=1: greedy
    # Each window's beam answer scores (mean log-probability per token, the score that picks a question's window)
    # at least as high as its greedy answer, and P(no answer | window) is the same: only the answer's side moves.
    assert greedy.module.windows.keys() == beam.module.windows.keys()
    for key, g in greedy.module.windows.items():
        b = beam.module.windows[key]
        assert b.score >= g.score - 1e-5 and b.na_logprob == pytest.approx(g.na_logprob, abs=1e-5), (key, g, b)
    assert beam.module.scores["total"] == 100 and beam.module.scores["f1"] >= greedy.module.scores["f1"] - 10

    # predict answers by the same beam search as evaluation scores
    answers = tmp_path / "answers.json"
    predicted = run_entry_point("flan_squad.predict", [
        f"run_dir={csv_run}", f"input_file={csv_files['validation']}", f"output_file={answers}", *RECORDS,
        "eval.max_new_tokens=4", "eval.num_beams=3", "batch_size=50", "precision=32-true"])
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert json.loads(answers.read_text()) == beam.module.predictions


def test_a_malformed_row_stops_the_run_in_one_line_naming_file_and_row(tmp_path, run_entry_point):
    bad = tmp_path / "bad.csv"
    bad.write_text("qid,passage,query,gold,gold_start,unanswerable\n"
                   'a,"Paris is the capital\nof France.",Which capital?,Paris,0,false\n'
                   "b,Rome is old.,Is Rome new?,,,true\n"
                   "c,Some context.,What?,,,false\n", encoding="utf-8")
    result = run_entry_point("flan_squad.train", ["experiment=smoke", *RECORDS, f"dataset.train_file={bad}",
                                                  f"dataset.validation_file={bad}", f"hydra.run.dir={tmp_path / 'r'}"])
    assert result.returncode == 2 and not (tmp_path / "r" / "metrics.json").exists()
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {bad}: row 3 (line 5): no answer in gold; mark an unanswerable question (SQuAD v2) with a true "
        f"no-answer column (dataset.columns.no_answer=unanswerable)")
