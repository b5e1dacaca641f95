"""The SQuAD format: questions and reading official-format files (the prompt is `flan_squad.data.prompts`).

No torch here: `flan_squad.score` reads data through this module alone. Tokenization and batching are
in `flan_squad.data.datamodule`, the scoring rules in `flan_squad.evaluation.metrics`.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flan_squad.utils.errors import FlanSquadError

log = logging.getLogger(__name__)

class DataError(FlanSquadError, ValueError):
    """Input data that cannot be used; the message names the file and the record."""


@dataclass(frozen=True)
class Question:
    """One SQuAD question, flattened out of its article and paragraph."""

    id: str
    question: str
    context: str
    answers: tuple[str, ...]  # gold answer texts; empty for an unanswerable v2 question
    answer_starts: tuple[int, ...] = ()
    title: str = ""

    @property
    def has_answer(self) -> bool:
        # The v2 script decides "has answer" by a non-empty answer list, not by `is_impossible`.
        return bool(self.answers)


def read_squad_file(path: str | Path) -> tuple[str, list[Question]]:
    """Read an official-format SQuAD JSON file; return its version ("v1"/"v2") and its questions."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (set dataset.train_file / dataset.validation_file)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    version, questions = _parse(content, path)
    return version, list(questions)


def _version(declared: Any, path: Path) -> str:
    """"v1" or "v2" from a file's `version`; one that is neither SQuAD's 1.1 nor 2.0 is warned about (as the official
    v1.1 script does: "Evaluation expects v-1.1, but got dataset with v-..."), not silently read as v1.1."""
    version = {"1.1": "v1", "2.0": "v2"}.get(str(declared).lstrip("v"))
    if version is None:
        version = "v2" if str(declared).lstrip("v").startswith("2") else "v1"
        log.warning("%s: version %s is neither SQuAD 1.1 nor 2.0: read and scored with the SQuAD %s rules",
                    path, "missing" if declared is None else repr(declared), "2.0" if version == "v2" else "1.1")
    return version


# Keyed by the file's bytes, so an edited file is parsed again: a multirun's jobs (and the tests) read the same
# few files many times in one process, and parsing SQuAD dev costs ~0.1 s a time.
@functools.lru_cache(maxsize=4)
def _parse(content: bytes, path: Path) -> tuple[str, tuple[Question, ...]]:
    try:
        raw = json.loads(content.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}): SQuAD files are UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None

    def fail(where: str, problem: str):
        raise DataError(f"{path}: {where}: {problem} (expected the official SQuAD format)")

    def get(obj: Any, key: str, kind: type, where: str):
        if not isinstance(obj, dict):
            fail(where, f"expected an object, found {type(obj).__name__}")
        if key not in obj:
            fail(where, f"missing key {key!r}")
        if not isinstance(obj[key], kind):
            expected = "/".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
            fail(f"{where}.{key}", f"expected {expected}, found {type(obj[key]).__name__}")
        return obj[key]

    articles = get(raw, "data", list, "top level")
    version = _version(raw.get("version"), path)
    questions: list[Question] = []
    seen: dict[str, str] = {}
    for a, article in enumerate(articles):
        title = article.get("title", "") if isinstance(article, dict) else ""
        for p, paragraph in enumerate(get(article, "paragraphs", list, f"data[{a}]")):
            where_p = f"data[{a}].paragraphs[{p}]"
            context = get(paragraph, "context", str, where_p)
            for q, qa in enumerate(get(paragraph, "qas", list, where_p)):
                where = f"{where_p}.qas[{q}]"
                qid = str(get(qa, "id", (str, int), where))
                if qid in seen:
                    fail(where, f"duplicate question id {qid!r} (first at {seen[qid]})")
                seen[qid] = where
                answers = get(qa, "answers", list, where)
                texts = tuple(get(ans, "text", str, f"{where}.answers[{i}]") for i, ans in enumerate(answers))
                starts = tuple(get(ans, "answer_start", int, f"{where}.answers[{i}]") if "answer_start" in ans else -1
                               for i, ans in enumerate(answers))
                if not texts and version == "v1":
                    fail(where, "a SQuAD v1.1 question needs at least one answer")
                questions.append(
                    Question(qid, get(qa, "question", str, where), context, texts, starts, str(title))
                )
    if not questions:
        raise DataError(f"{path}: holds no questions")
    return version, tuple(questions)
