"""The official SQuAD scoring rules, v1.1 and v2.0, in one place.

Every score this project reports (training validation, `metrics.json`, `flan_squad.score`) comes from
here. The functions follow the official evaluation scripts, including their order of summation, so that
the numbers are identical to the last floating-point bit (tests/golden/ holds the scripts' own figures):
- v1.1: https://worksheets.codalab.org/rest/bundles/0xbcd57bee090b421c982906709c8c27e1/contents/blob/
- v2.0: https://worksheets.codalab.org/rest/bundles/0x6b567e1cf2e041ec80d7098f031c5c9e/contents/blob/

Questions are given as `Question` records in dataset order (see `flan_squad.data.squad.read_squad_file`);
predictions as `{question_id: answer_text}`, where "" means "no answer".
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

from flan_squad.data.squad import Question
from flan_squad.utils.errors import FlanSquadError

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, empty_is_no_answer: bool = False) -> float:
    """Token F1 of the normalised texts, as both official scripts compute it.

    v1.1 scores an empty side 0 (it shares no token). v2.0 (`empty_is_no_answer`) reads an empty side as
    "no answer": 1 if both sides are empty, 0 if only one is.
    """
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if empty_is_no_answer and not (prediction_tokens and gold_tokens):
        return int(prediction_tokens == gold_tokens)
    num_same = sum((collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)).values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


# --- v1.1 -----------------------------------------------------------------------------------------


def evaluate_v1(questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
    """The v1.1 script's `evaluate`: a missing prediction scores 0 (and still counts in the total)."""
    f1 = exact_match = total = 0
    for q in questions:
        total += 1
        if q.id not in predictions:
            continue
        prediction = predictions[q.id]
        exact_match += max(exact_match_score(prediction, gold) for gold in q.answers)
        f1 += max(f1_score(prediction, gold) for gold in q.answers)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


# --- v2.0 -----------------------------------------------------------------------------------------


def raw_scores_v2(questions: Sequence[Question], predictions: Mapping[str, str]) -> tuple[dict, dict]:
    exact_scores: dict[str, float] = {}
    f1_scores: dict[str, float] = {}
    for q in questions:
        gold_answers = [a for a in q.answers if normalize_answer(a)]
        if not gold_answers:
            gold_answers = [""]  # for an unanswerable question the only right answer is empty
        if q.id not in predictions:
            continue
        prediction = predictions[q.id]
        exact_scores[q.id] = max(exact_match_score(prediction, gold) for gold in gold_answers)
        f1_scores[q.id] = max(f1_score(prediction, gold, empty_is_no_answer=True) for gold in gold_answers)
    return exact_scores, f1_scores


def _apply_no_answer_threshold(scores, na_probs, has_answer, threshold):
    return {
        qid: (float(not has_answer[qid]) if na_probs[qid] > threshold else s) for qid, s in scores.items()
    }


def apply_threshold(predictions: Mapping[str, str], na_probs: Mapping[str, float], threshold: float) -> dict[str, str]:
    """The answers that the v2 rules score at `na_prob_thresh=threshold`: "" (no answer) where the no-answer
    probability is above it. At a run's `best_f1_thresh` they score its `best_f1` (unless probabilities tie there)."""
    return {qid: "" if na_probs[qid] > threshold else answer for qid, answer in predictions.items()}


def _eval_dict(exact_scores, f1_scores, qid_list=None) -> dict:
    if not qid_list:
        total = len(exact_scores)
        return {
            "exact": 100.0 * sum(exact_scores.values()) / total,
            "f1": 100.0 * sum(f1_scores.values()) / total,
            "total": total,
        }
    total = len(qid_list)
    return {
        "exact": 100.0 * sum(exact_scores[k] for k in qid_list) / total,
        "f1": 100.0 * sum(f1_scores[k] for k in qid_list) / total,
        "total": total,
    }


def _best_threshold(predictions, scores, na_probs, has_answer) -> tuple[float, float]:
    num_no_answer = sum(1 for k in has_answer if not has_answer[k])
    current = best = num_no_answer
    best_threshold = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            diff = scores[qid]
        else:
            diff = -1 if predictions[qid] else 0
        current += diff
        if current > best:
            best = current
            best_threshold = na_probs[qid]
    return 100.0 * best / len(scores), best_threshold


def evaluate_v2(
    questions: Sequence[Question],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_threshold: float = 1.0,
) -> dict:
    """The v2.0 script's `main`: overall, HasAns_* and NoAns_* scores, and best_* with `na_probs`."""
    has_answer = {q.id: q.has_answer for q in questions}
    has_answer_ids = [k for k, v in has_answer.items() if v]
    no_answer_ids = [k for k, v in has_answer.items() if not v]
    probs = dict(na_probs) if na_probs is not None else {k: 0.0 for k in predictions}
    exact_raw, f1_raw = raw_scores_v2(questions, predictions)
    exact = _apply_no_answer_threshold(exact_raw, probs, has_answer, na_prob_threshold)
    f1 = _apply_no_answer_threshold(f1_raw, probs, has_answer, na_prob_threshold)
    result = _eval_dict(exact, f1)
    if has_answer_ids:
        for key, value in _eval_dict(exact, f1, has_answer_ids).items():
            result[f"HasAns_{key}"] = value
    if no_answer_ids:
        for key, value in _eval_dict(exact, f1, no_answer_ids).items():
            result[f"NoAns_{key}"] = value
    if na_probs is not None:
        result["best_exact"], result["best_exact_thresh"] = _best_threshold(predictions, exact_raw, probs, has_answer)
        result["best_f1"], result["best_f1_thresh"] = _best_threshold(predictions, f1_raw, probs, has_answer)
    return result


# --- one entry point for the project ------------------------------------------------------------


class ScoreError(FlanSquadError, ValueError):
    """Predictions that cannot be scored (e.g. some questions have none); the message says which."""


MISSING_POLICIES = ("refuse", "wrong")


def score(
    version: str,
    questions: Sequence[Question],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    *,
    missing: str = "refuse",
    na_prob_thresh: float = 1.0,
) -> dict:
    """Score with the rules of SQuAD `version` ("v1" or "v2"), in a common shape: the one scoring function of
    training validation, `flan_squad.evaluate` and `flan_squad.score`.

    Returns `exact`, `f1`, `total` for both versions (v1.1's `exact_match` is renamed `exact`), plus the
    v2 breakdowns (and `best_*` with `na_probs`). A question without a prediction is what `missing` says:
    "refuse" (a `ScoreError` naming the ids: the official scripts disagree on what it means, v1.1 scoring it 0
    and v2.0 dropping it from the total), or "wrong" (a prediction sharing no token with any gold answer, and on
    v2 a no-answer probability of 0, so that no threshold can make it right).
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing={missing!r}: expected one of {MISSING_POLICIES}")
    if not questions:
        raise ScoreError("no questions to score")
    absent = [q.id for q in questions if q.id not in predictions]
    if absent and missing == "refuse":
        raise ScoreError(f"{len(absent)} of {len(questions)} questions have no prediction, e.g. {absent[:5]} "
                         f"(flan_squad.score --allow-missing scores them as wrong)")
    if absent:
        by_id = {q.id: q for q in questions}
        predictions = {**predictions, **{qid: wrong_answer(by_id[qid]) for qid in absent}}
        if na_probs is not None:
            na_probs = {**na_probs, **{qid: 0.0 for qid in absent}}
    if version == "v1":
        official = evaluate_v1(questions, predictions)
        return {"exact": official["exact_match"], "f1": official["f1"], "total": len(questions)}
    if version == "v2":
        if na_probs is not None:
            lacking = [qid for qid in predictions if qid not in na_probs]
            if lacking:
                raise ScoreError(f"no no-answer probability for {len(lacking)} predicted question(s), "
                                 f"e.g. {lacking[:5]}")
        return evaluate_v2(questions, predictions, na_probs, na_prob_thresh)
    raise ValueError(f"unknown SQuAD version {version!r}: expected 'v1' or 'v2'")


def wrong_answer(question: Question) -> str:
    """A prediction that scores 0 on `question` under both versions' rules: non-empty, no shared token."""
    gold_tokens = {t for a in question.answers for t in normalize_answer(a).split()}
    filler = "\u2205"  # survives normalisation (not ASCII punctuation), so it is never "no answer"
    while filler in gold_tokens:
        filler += "\u2205"
    return filler
