"""Official SQuAD scoring rules on hand-computed cases."""

from __future__ import annotations

import pytest

from flan_squad.data.squad import Question
from flan_squad.evaluation.metrics import ScoreError, normalize_answer, score


def q(qid, *answers):
    return Question(qid, "?", "ctx", tuple(answers))


@pytest.mark.parametrize("text, normalized", [
    ("The Eiffel Tower", "eiffel tower"), ("  a  cat,  an apple ", "cat apple"), ("Theory", "theory"),
    ("U.S.A.", "usa"), ("«quoted»", "«quoted»"), ("the", ""), ("", ""),
    ("«the»", "« »"),  # an article is replaced by a space, which splits what stood around it
])
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_v1_exact_and_f1_hand_computed():
    questions = [q("1", "Paris", "in Paris"), q("2", "the blue sky"), q("3", "1945")]
    predictions = {"1": "paris.", "2": "blue sea", "3": "in 1944"}
    result = score("v1", questions, predictions)
    # 1: exact. 2: tokens [blue, sea] vs [blue, sky]: P=R=1/2, F1=1/2. 3: no overlap: 0.
    assert result == {"exact": 100 / 3, "f1": 100 * 1.5 / 3, "total": 3}


def test_v1_empty_prediction_scores_zero():
    assert score("v1", [q("1", "Paris")], {"1": ""})["f1"] == 0


def test_v2_empty_answers_and_breakdowns():
    questions = [q("has", "Paris"), q("none"), q("none2"), q("punct-only", "!!")]
    predictions = {"has": "Paris", "none": "", "none2": "London", "punct-only": ""}
    result = score("v2", questions, predictions)
    # "punct-only" has an answer that normalises to empty: gold becomes [""] but it still counts as HasAns.
    assert result["exact"] == 75.0 and result["f1"] == 75.0 and result["total"] == 4
    assert result["HasAns_total"] == 2 and result["HasAns_exact"] == 100.0
    assert result["NoAns_total"] == 2 and result["NoAns_exact"] == 50.0


def test_missing_predictions_are_refused_unless_the_caller_says_they_are_wrong():
    questions = [q("1", "Paris"), q("2", "Rome")]
    with pytest.raises(ScoreError, match=r"1 of 2 questions have no prediction, e.g. \['2'\]"):
        score("v1", questions, {"1": "Paris"})
    assert score("v1", questions, {"1": "Paris"}, missing="wrong") == {"exact": 50.0, "f1": 50.0, "total": 2}
    # v2: a missing answer counts as answered (no-answer probability 0): no threshold can make it right
    v2 = [q("1", "Paris"), Question("2", "Q?", "ctx", ())]
    result = score("v2", v2, {"1": "Paris"}, {"1": 0.2}, missing="wrong")
    assert result["exact"] == 50.0 and result["NoAns_exact"] == 0.0 and result["best_exact"] == 50.0
    with pytest.raises(ValueError, match="missing='skip'"):
        score("v1", questions, {"1": "Paris", "2": "Rome"}, missing="skip")
