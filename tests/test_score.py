"""`flan_squad.score` against golden figures of the official SQuAD scripts (tests/golden/), and by hand."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SQUAD
from flan_squad import score as score_cli
from flan_squad.data.squad import Question
from flan_squad.evaluation.metrics import score
from flan_squad.utils.config import PROJECT_ROOT

GOLDEN = {path.stem: json.loads(path.read_text(encoding="utf-8"))
          for path in sorted((Path(__file__).parent / "golden").glob("*.json"))}
CASES = [(name, case["name"]) for name, golden in GOLDEN.items() for case in golden["cases"]]


@functools.cache
def _dev(data_file: str) -> dict:
    return json.loads((SQUAD / data_file).read_text(encoding="utf-8"))


def subset(golden: dict) -> dict:
    """The golden file's questions, cut out of the real dev file: official nested format, file order."""
    data, keep = _dev(golden["data_file"]), set(golden["question_ids"])
    articles = []
    for article in data["data"]:
        paragraphs = [{"context": p["context"], "qas": [qa for qa in p["qas"] if qa["id"] in keep]}
                      for p in article["paragraphs"]]
        if any(p["qas"] for p in paragraphs):
            articles.append({"title": article["title"], "paragraphs": [p for p in paragraphs if p["qas"]]})
    found = sum(len(p["qas"]) for a in articles for p in a["paragraphs"])
    assert found == len(keep), f"{golden['data_file']} lacks {len(keep) - found} of the golden question ids"
    return {"version": data["version"], "data": articles}


def case_files(golden: dict, case: dict, directory: Path) -> list[str]:
    """Write a case's data, predictions and no-answer probabilities; return the arguments common to the
    official script and `flan_squad.score` (tests/golden/README.md: how the figures were recorded)."""
    data_file, pred_file = directory / "data.json", directory / "pred.json"
    data_file.write_text(json.dumps(subset(golden)), encoding="utf-8")
    pred_file.write_text(json.dumps(case["predictions"]), encoding="utf-8")
    args = [str(data_file), str(pred_file)]
    if "na_probs" in case:
        (directory / "na_probs.json").write_text(json.dumps(case["na_probs"]), encoding="utf-8")
        args += ["--na-prob-file", str(directory / "na_probs.json")]
    return args + case.get("options", [])


def _ours(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = score_cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _case(golden_name: str, case_name: str) -> tuple[dict, dict]:
    golden = GOLDEN[golden_name]
    return golden, next(case for case in golden["cases"] if case["name"] == case_name)


# --- golden figures: the official scripts' output on odd predictions, to the bit and the layout ----------


@pytest.mark.parametrize("golden_name, case_name", CASES)
def test_prints_what_the_official_script_printed(golden_name, case_name, tmp_path):
    golden, case = _case(golden_name, case_name)
    allow_missing = ["--allow-missing"] if case.get("allow_missing") else []
    code, out, _ = _ours(*case_files(golden, case, tmp_path), *allow_missing)
    assert code == 0
    assert out == case["stdout"]  # same keys in the same order, same float repr (every bit), same layout


@pytest.mark.parametrize("golden_name, case_name", CASES)
def test_a_changed_prediction_changes_the_output(golden_name, case_name, tmp_path):
    # The comparison above can fail: one prediction changed as the case's `perturbation` says (a change
    # that changed the official script's output) changes ours too.
    golden, case = _case(golden_name, case_name)
    case = {**case, "predictions": {**case["predictions"], **case["perturbation"]}}
    allow_missing = ["--allow-missing"] if case.get("allow_missing") else []
    code, out, _ = _ours(*case_files(golden, case, tmp_path), *allow_missing)
    assert code == 0 and out != case["stdout"]


def test_golden_cases_cover_the_awkward_inputs():
    v1, v2 = GOLDEN["score_v1.1"], GOLDEN["score_v2.0"]
    predictions = [p for golden in (v1, v2) for case in golden["cases"] for p in case["predictions"].values()]
    assert "" in predictions and any(p.lower() == "unanswerable" for p in predictions)
    assert any(ch in p for p in predictions for ch in "«’—\u00a0\u3000é中")  # unicode, non-ASCII punctuation
    assert any(case.get("allow_missing") for case in v1["cases"])
    na_probs = [case["na_probs"] for case in v2["cases"] if "na_probs" in case]
    assert any(len(set(p.values())) < len(p) for p in na_probs)  # ties in the threshold search
    assert any("na_probs" not in case for case in v2["cases"]) and any(case.get("options") for case in v2["cases"])


def test_score_imports_neither_torch_nor_lightning(tmp_path):
    # Scoring a file must not need (or wait ~9 s for) the training stack.
    golden = GOLDEN["score_v2.0"]
    case = next(case for case in golden["cases"] if "na_probs" in case)
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "flan_squad.score",
                             *case_files(golden, case, tmp_path)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == case["stdout"]
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "flan_squad.evaluation.metrics" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "lightning", "transformers")]


# --- what the official scripts do not do: missing predictions, bad files, --out-file ---------------------


@pytest.fixture
def dev_files(tmp_path) -> dict[str, Path]:
    files = {}
    for version, golden in (("v1", GOLDEN["score_v1.1"]), ("v2", GOLDEN["score_v2.0"])):
        files[version] = tmp_path / f"{version}.json"
        files[version].write_text(json.dumps(subset(golden)), encoding="utf-8")
    return files


def _questions(data_file: Path) -> list[dict]:
    data = json.loads(data_file.read_text(encoding="utf-8"))
    return [qa for art in data["data"] for par in art["paragraphs"] for qa in par["qas"]]


def test_missing_predictions_fail_listing_ids_unless_allowed(dev_files, tmp_path):
    questions = _questions(dev_files["v1"])
    predictions = {qa["id"]: qa["answers"][0]["text"] for qa in questions[2:]}
    pred_file = tmp_path / "pred.json"
    pred_file.write_text(json.dumps(predictions), encoding="utf-8")
    code, out, err = _ours(dev_files["v1"], pred_file)
    n = len(questions)
    assert code == 2 and out == ""
    assert f"2 of {n} questions have no prediction" in err and questions[0]["id"] in err and questions[1]["id"] in err
    code, out, err = _ours(dev_files["v1"], pred_file, "--allow-missing")
    # v1.1's own rule for a missing prediction is "score 0" (golden case "missing_predictions" checks it).
    assert code == 0 and f"2 of {n}" in err and json.loads(out)["exact_match"] == 100.0 * (n - 2) / n


def test_v2_allow_missing_scores_them_wrong_even_for_unanswerable(dev_files, tmp_path):
    questions = _questions(dev_files["v2"])
    no_answer = [qa for qa in questions if not qa["answers"]]
    # Perfect predictions, except one unanswerable question left out ("" would have been right).
    predictions = {qa["id"]: (qa["answers"][0]["text"] if qa["answers"] else "") for qa in questions}
    del predictions[no_answer[0]["id"]]
    pred_file, na_file = tmp_path / "pred.json", tmp_path / "na.json"
    pred_file.write_text(json.dumps(predictions), encoding="utf-8")
    na_file.write_text(json.dumps({k: 1.0 for k in predictions}), encoding="utf-8")
    code, out, _ = _ours(dev_files["v2"], pred_file, "--allow-missing", "--na-prob-file", na_file)
    result, n = json.loads(out), len(questions)
    assert code == 0 and result["total"] == n and result["exact"] == 100.0 * (n - 1) / n
    assert result["NoAns_exact"] == 100.0 * (len(no_answer) - 1) / len(no_answer)
    assert result["best_exact"] == 100.0 * (n - 1) / n  # no threshold can rescue a missing prediction


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected a JSON object"), ('{"a": 3}', "prediction for 'a' is int"), ("{", "not a UTF-8 JSON"),
])
def test_bad_prediction_files_name_the_file(content, message, dev_files, tmp_path):
    pred_file = tmp_path / "bad.json"
    pred_file.write_text(content, encoding="utf-8")
    code, _, err = _ours(dev_files["v1"], pred_file)
    assert code == 2 and err.startswith(f"error: {pred_file}") and message in err


def test_out_file_holds_the_printed_scores(tmp_path):
    golden = GOLDEN["score_v2.0"]
    case = next(case for case in golden["cases"] if "na_probs" in case)
    out_file = tmp_path / "eval.json"
    code, out, _ = _ours(*case_files(golden, case, tmp_path), "--out-file", out_file)
    assert code == 0 and out == ""
    assert json.loads(out_file.read_text()) == json.loads(case["stdout"])


# --- hand-computed cases: every normalisation rule, the v2 empty-answer rules, the threshold search ------


def q(qid, *answers):
    return Question(qid, "?", "ctx", tuple(answers))


@pytest.mark.parametrize("prediction, gold, exact, f1", [
    ("PARIS", "paris", 1, 1.0),                      # case
    ("Paris.", "Paris", 1, 1.0),                     # ASCII punctuation dropped
    ("Paris«", "Paris", 0, 0.0),                     # unicode punctuation kept: "paris«" is another token
    ("the Paris", "Paris", 1, 1.0),                  # articles a/an/the dropped ...
    ("theParis", "Paris", 0, 0.0),                   # ... as whole words only
    ("An apple", "apple", 1, 1.0),
    ("  new \t york\n", "new york", 1, 1.0),         # whitespace collapsed
    ("new-york", "new york", 0, 0.0),                # "-" is removed without a space: "newyork"
    ("new york city", "new york", 0, 0.8),           # P=2/3, R=1: F1=0.8
    ("york york", "york", 0, 2 * 0.5 / 1.5),         # repeated tokens count once per match: P=1/2, R=1
])
def test_normalisation_rules_v1(prediction, gold, exact, f1):
    result = score("v1", [q("1", gold)], {"1": prediction})
    assert result["exact"] == 100.0 * exact and result["f1"] == pytest.approx(100.0 * f1, abs=1e-12)


def test_v2_empty_answer_rules():
    questions = [q("no1"), q("no2"), q("dot", "."), q("has", "Paris")]
    # no1: "" is right. no2: "the" normalises to "" but is not empty: F1 uses tokens (both empty) -> 1.
    # dot: gold "." normalises to "" and is dropped; gold becomes [""], so "" is right (but it is HasAns).
    # has: "" scores 0.
    result = score("v2", questions, {"no1": "", "no2": "the", "dot": "", "has": ""})
    assert result["exact"] == 75.0 and result["f1"] == 75.0
    assert result["HasAns_total"] == 2 and result["HasAns_exact"] == 50.0
    assert result["NoAns_total"] == 2 and result["NoAns_exact"] == 100.0


def test_v1_has_no_empty_answer_rule():
    assert score("v1", [q("1", ".")], {"1": ""}) == {"exact": 100.0, "f1": 0.0, "total": 1}


def test_threshold_search_hand_computed():
    questions = [q("a", "x"), q("b", "y"), q("n1"), q("n2")]
    predictions = {"a": "x", "b": "wrong", "n1": "z", "n2": ""}
    na_probs = {"a": 0.1, "b": 0.6, "n1": 0.7, "n2": 0.2}
    result = score("v2", questions, predictions, na_probs)
    # Start: everything "no answer" = 2 right (n1, n2). Raise the threshold past a (0.1): +1 -> 3 (best, 0.1).
    # past n2 (0.2): "" stays right: +0. past b (0.6): +0. past n1 (0.7): its answer is wrong now: -1.
    assert result["best_exact"] == 75.0 and result["best_exact_thresh"] == 0.1
    assert result["best_f1"] == 75.0 and result["best_f1_thresh"] == 0.1
    assert result["exact"] == 50.0  # without thresholding: a and n2 right
