"""`flan_squad.score` against the official SQuAD scripts (verbatim copies in tests/official/) and by hand."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import random
import runpy
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEV_V1, DEV_V2
from flan_squad import score as score_cli
from flan_squad.metrics import Question, score

OFFICIAL = Path(__file__).parent / "official"


def _subset(path: Path, n: int, seed: int, version: str) -> dict:
    """n random questions of a real dev file, kept in the official nested format."""
    data = json.loads(path.read_text(encoding="utf-8"))
    qas = [(a, p, q) for a, art in enumerate(data["data"]) for p, par in enumerate(art["paragraphs"])
           for q in range(len(par["qas"]))]
    keep = set(random.Random(seed).sample(qas, n))
    articles = []
    for a, art in enumerate(data["data"]):
        paragraphs = []
        for p, par in enumerate(art["paragraphs"]):
            kept = [qa for q, qa in enumerate(par["qas"]) if (a, p, q) in keep]
            if kept:
                paragraphs.append({"context": par["context"], "qas": kept})
        if paragraphs:
            articles.append({"title": art["title"], "paragraphs": paragraphs})
    return {"version": version, "data": articles}


@pytest.fixture(scope="module")
def dev_subsets(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dev")
    files = {}
    for name, path, version in (("v1", DEV_V1, "1.1"), ("v2", DEV_V2, "v2.0")):
        files[name] = directory / f"{name}.json"
        files[name].write_text(json.dumps(_subset(path, 40, 0, version)), encoding="utf-8")
    return files


def _questions(data_file: Path) -> list[dict]:
    data = json.loads(data_file.read_text(encoding="utf-8"))
    return [qa for art in data["data"] for par in art["paragraphs"] for qa in par["qas"]]


def _official_v1(data_file: Path, pred_file: Path) -> str:
    out = io.StringIO()
    argv = sys.argv
    sys.argv = ["evaluate-v1.1.py", str(data_file), str(pred_file)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_path(str(OFFICIAL / "evaluate_v1_1.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


def _official_v2(data_file: Path, pred_file: Path, na_prob_file: Path | None = None) -> str:
    spec = importlib.util.spec_from_file_location("official_v2", OFFICIAL / "evaluate_v2_0.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.OPTS = argparse.Namespace(data_file=str(data_file), pred_file=str(pred_file), out_file=None,
                                     na_prob_file=str(na_prob_file) if na_prob_file else None,
                                     na_prob_thresh=1.0, out_image_dir=None, verbose=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main()
    return out.getvalue()


def _ours(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = score_cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


# Odd predictions: unicode, punctuation (ASCII and not), articles, case, whitespace, empty strings.
ODD_PIECES = list("aAnN tThHeE.,;!?'\"-()«»—’…éüß中\t\n 0123") + ["the ", " a ", "an ", "\u00a0", "\u3000"]
ODD_TEXT = st.lists(st.sampled_from(ODD_PIECES), max_size=12).map("".join)


def _variant(gold: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(gold), st.just(""), st.just("unanswerable"), ODD_TEXT,
        st.builds(lambda pre, post: pre + gold + post, ODD_TEXT, ODD_TEXT),
        st.just(gold.upper()), st.just(f"  The {gold}!! "), st.just(" ".join(gold.split()[:1])),
    )


def _predictions(questions: list[dict]) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({
        qa["id"]: _variant(qa["answers"][0]["text"] if qa["answers"] else "paris") for qa in questions
    })


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data())
def test_v1_equals_the_official_script(data, dev_subsets, tmp_path):
    predictions = data.draw(_predictions(_questions(dev_subsets["v1"])))
    pred_file = tmp_path / "pred.json"
    pred_file.write_text(json.dumps(predictions), encoding="utf-8")
    code, out, _ = _ours(dev_subsets["v1"], pred_file)
    assert code == 0
    assert out == _official_v1(dev_subsets["v1"], pred_file)  # same keys, values and layout, to the bit
    assert list(json.loads(out)) == ["exact_match", "f1"]


@SETTINGS
@given(data=st.data())
def test_v2_equals_the_official_script_with_and_without_na_probs(data, dev_subsets, tmp_path):
    questions = _questions(dev_subsets["v2"])
    predictions = data.draw(_predictions(questions))
    probs = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0.0, 1.0))  # ties matter
    na_probs = data.draw(st.fixed_dictionaries({qa["id"]: probs for qa in questions}))
    pred_file, na_file = tmp_path / "pred.json", tmp_path / "na.json"
    pred_file.write_text(json.dumps(predictions), encoding="utf-8")
    na_file.write_text(json.dumps(na_probs), encoding="utf-8")
    code, out, _ = _ours(dev_subsets["v2"], pred_file)
    assert code == 0 and out == _official_v2(dev_subsets["v2"], pred_file)
    code, out, _ = _ours(dev_subsets["v2"], pred_file, "--na-prob-file", na_file)
    assert code == 0 and out == _official_v2(dev_subsets["v2"], pred_file, na_file)
    assert {"best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh", "HasAns_f1", "NoAns_f1"} <= set(json.loads(out))


def test_missing_predictions_fail_listing_ids_unless_allowed(dev_subsets, tmp_path):
    questions = _questions(dev_subsets["v1"])
    predictions = {qa["id"]: qa["answers"][0]["text"] for qa in questions[2:]}
    pred_file = tmp_path / "pred.json"
    pred_file.write_text(json.dumps(predictions), encoding="utf-8")
    code, out, err = _ours(dev_subsets["v1"], pred_file)
    assert code == 2 and out == ""
    assert "2 of 40 questions have no prediction" in err and questions[0]["id"] in err and questions[1]["id"] in err
    code, out, err = _ours(dev_subsets["v1"], pred_file, "--allow-missing")
    # v1.1's own rule for a missing prediction is "score 0": the official script must agree.
    assert code == 0 and "2 of 40" in err and out == _official_v1(dev_subsets["v1"], pred_file)
    assert json.loads(out)["exact_match"] == 100.0 * 38 / 40


def test_v2_allow_missing_scores_them_wrong_even_for_unanswerable(dev_subsets, tmp_path):
    questions = _questions(dev_subsets["v2"])
    no_answer = [qa for qa in questions if not qa["answers"]]
    # Perfect predictions, except one unanswerable question left out ("" would have been right).
    predictions = {qa["id"]: (qa["answers"][0]["text"] if qa["answers"] else "") for qa in questions}
    del predictions[no_answer[0]["id"]]
    pred_file, na_file = tmp_path / "pred.json", tmp_path / "na.json"
    pred_file.write_text(json.dumps(predictions), encoding="utf-8")
    na_file.write_text(json.dumps({k: 1.0 for k in predictions}), encoding="utf-8")
    code, out, _ = _ours(dev_subsets["v2"], pred_file, "--allow-missing", "--na-prob-file", na_file)
    result = json.loads(out)
    assert code == 0 and result["total"] == 40 and result["exact"] == 100.0 * 39 / 40
    assert result["NoAns_exact"] == 100.0 * (len(no_answer) - 1) / len(no_answer)
    assert result["best_exact"] == 100.0 * 39 / 40  # no threshold can rescue a missing prediction


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected a JSON object"), ('{"a": 3}', "prediction for 'a' is int"), ("{", "not a UTF-8 JSON"),
])
def test_bad_prediction_files_name_the_file(content, message, dev_subsets, tmp_path):
    pred_file = tmp_path / "bad.json"
    pred_file.write_text(content, encoding="utf-8")
    code, _, err = _ours(dev_subsets["v1"], pred_file)
    assert code == 2 and err.startswith(f"error: {pred_file}") and message in err


def test_out_file_holds_the_printed_scores(dev_subsets, tmp_path):
    questions = _questions(dev_subsets["v2"])
    pred_file, out_file = tmp_path / "pred.json", tmp_path / "eval.json"
    pred_file.write_text(json.dumps({qa["id"]: "" for qa in questions}), encoding="utf-8")
    code, out, _ = _ours(dev_subsets["v2"], pred_file, "--out-file", out_file)
    assert code == 0 and out == ""
    assert json.loads(out_file.read_text()) == json.loads(_official_v2(dev_subsets["v2"], pred_file))


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
