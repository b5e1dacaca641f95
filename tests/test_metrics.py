"""Official SQuAD scoring rules on hand-computed cases."""

from __future__ import annotations

import pytest

from flan_squad.evaluation.metrics import normalize_answer, score
from flan_squad.data.squad import Question


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


def test_missing_predictions_are_refused():
    with pytest.raises(KeyError, match="1 question"):
        score("v1", [q("1", "a"), q("2", "b")], {"1": "a"})
