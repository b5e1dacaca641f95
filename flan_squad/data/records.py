"""Your own data: flat question records (JSONL, a JSON list, CSV, Parquet, or a Hugging Face dataset) read into
`Question`s through one column mapping, `dataset.columns` (conf/dataset). No torch.

A record holds a context, a question and its gold answers: a list (`answers`: texts, or SQuAD's
`{"text": [...], "answer_start": [...]}`), or one text (`answer`, with an optional `answer_start`); an optional id
(default: `row-<n>`); and for SQuAD v2 an explicit "no answer": a true `no_answer` column (e.g. `is_impossible`), or
an empty answer list. A blank answer alone is an error, never a silent "unanswerable".

One reader per format turns a file into `(where, record)` pairs; `to_question` is the one place the mapping is applied,
to files and hub rows alike. `read_data_file` picks the reader by extension; `.json` holding an object is the
official SQuAD format (`flan_squad.data.squad`), which has fixed field names and ignores the mapping.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from flan_squad.data.squad import DataError, Question, read_squad_file
from flan_squad.utils.errors import ConfigError

_TRUE, _FALSE = {"true", "1", "yes", "y", "t"}, {"false", "0", "no", "n", "f", ""}


@dataclass(frozen=True)
class Columns:
    """Which column of the data holds each field (`dataset.columns`); a column the data lacks is an absent field."""

    context: str
    question: str
    answers: str | None  # a list of answer texts, or SQuAD's {"text": [...], "answer_start": [...]}
    answer: str | None  # ... or one answer text (used when the data has no `answers` column)
    answer_start: str | None  # optional: where `answer` starts in the context (a list, beside `answers`)
    id: str | None  # optional: row-<n> (the record's number, from 1) when the data has none
    no_answer: str | None  # v2: true marks an unanswerable question (true/false, 1/0, yes/no)

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any] | None) -> Columns:
        """From `dataset.columns`; an unknown or missing field is a one-line error naming it."""
        names = [f.name for f in fields(cls)]
        mapping = dict(mapping or {})
        unknown = sorted(set(mapping) - set(names))
        if unknown:
            raise ConfigError(f"dataset.columns.{unknown[0]}: not a field (the fields: {', '.join(names)})")
        missing = [n for n in names if n not in mapping]
        if missing or not mapping["context"] or not mapping["question"]:
            name = (missing or [n for n in ("context", "question") if not mapping[n]])[0]
            raise ConfigError(f"dataset.columns.{name}: must name the column that holds the {name}")
        return cls(**{n: None if mapping[n] is None else str(mapping[n]) for n in names})


# --- one reader per format: (where, record) pairs --------------------------------------------------------


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    n = 0
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            n += 1
            try:
                yield f"row {n} (line {line_number})", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {n} (line {line_number}): not JSON ({e.msg})") from None


def _json_list_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    for n, record in enumerate(records, 1):
        yield f"row {n}", record


def _csv_records(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if len(set(header)) != len(header):
            raise DataError(f"{path}: the header names a column twice ({', '.join(header)})")
        end = reader.line_num
        for n, row in enumerate(reader, 1):
            where, end = f"row {n} (line {end + 1})", reader.line_num  # a quoted context may span lines
            fields = len(header) + len(row[None]) if None in row else sum(v is not None for v in row.values())
            if fields != len(header):
                raise DataError(f"{path}: {where}: {fields} fields, the header has {len(header)}")
            yield where, row


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a file that is not Parquet
        raise DataError(f"{path}: not a Parquet file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    n = 0
    for batch in table.iter_batches():
        for record in batch.to_pylist():
            n += 1
            yield f"row {n}", record


def _columns_of(records: list[tuple[str, Any]], source: str) -> set[str]:
    """The columns the records have between them; each must be a record (an object of columns)."""
    present: set[str] = set()
    for where, record in records:
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise DataError(f"{source}: {where}: expected a record (an object of columns), found {kind}")
        present.update(record)
    return present


# --- the mapping ------------------------------------------------------------------------------------------


def _missing(value: Any) -> bool:
    """An empty cell: None, blank text, or NaN (what pandas, and so `datasets`' CSV loader, reads a blank cell as)."""
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float)
                                                                              and value != value)


def _text(value: Any, field: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: {field} is {type(value).__name__}, expected text")
    return str(value)


def _flag(value: Any, where: str, column: str) -> bool:
    if _missing(value) or isinstance(value, bool):
        return value is True
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(f"{where}: {column}={value!r}: expected true/false (1/0, yes/no) for the no-answer column")


def _start(value: Any, where: str, column: str) -> int:
    if _missing(value):
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {column}={value!r}: expected a character offset (a whole number)") from None


def _json_list(value: Any, where: str, column: str) -> Any:
    """A CSV cell holds a list as JSON text (`["Paris", "in Paris"]`); other values pass as they are."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {column}: not a JSON list ({e.msg})") from None
    return value


def _answers(record: dict, columns: Columns, present: set[str],
             where: str) -> tuple[tuple[str, ...], tuple[int, ...], bool]:
    """The gold answers, their offsets (-1: unknown), and whether the record says "no answer" with an empty list;
    from the `answers` column, else the `answer` one."""
    start_col = columns.answer_start if columns.answer_start in present else None
    value = record.get(columns.answers) if columns.answers in present else None
    if not _missing(value):
        value = _json_list(value, where, columns.answers)
        starts: Any = None
        if isinstance(value, dict):  # SQuAD's (and the hub's) {"text": [...], "answer_start": [...]}
            value, starts = value.get("text"), value.get("answer_start")
        elif start_col:
            starts = _json_list(record.get(start_col), where, start_col)
        if not isinstance(value, list):
            raise DataError(f"{where}: {columns.answers} is {type(value).__name__}, expected a list of answer texts")
        texts = tuple(_text(v, f"{columns.answers}[{i}]", where) for i, v in enumerate(value))
        if not isinstance(starts, list) or len(starts) != len(texts):
            starts = [None] * len(texts)
        return texts, tuple(_start(s, where, f"{columns.answers} answer_start") for s in starts), not texts
    value = record.get(columns.answer) if columns.answer in present else None
    if _missing(value):
        return (), (), False
    return (_text(value, columns.answer, where),), (_start(record.get(start_col), where, start_col),), False


def to_question(record: Any, columns: Columns, present: set[str], where: str, default_id: str,
                with_answers: bool = True) -> Question:
    """One record as a `Question`, through the column mapping; `present`: the columns the data has. Errors name
    `where` (the file and row) and the column."""
    qid = default_id
    if columns.id in present:
        value = record.get(columns.id)
        if _missing(value):
            raise DataError(f"{where}: empty {columns.id} (dataset.columns.id)")
        qid = _text(value, columns.id, where)
    context = _text(record.get(columns.context), columns.context, where)
    question = _text(record.get(columns.question), columns.question, where)
    if not with_answers:
        return Question(qid, question, context, ())
    texts, starts, empty_list = _answers(record, columns, present, where)  # [] says "no answer", as SQuAD v2's does
    unanswerable = columns.no_answer in present and _flag(record.get(columns.no_answer), where, columns.no_answer)
    if unanswerable and texts:
        raise DataError(f"{where}: marked unanswerable ({columns.no_answer}) but has an answer ({texts[0]!r:.40})")
    if not texts and not (unanswerable or empty_list):
        column = columns.answers if columns.answers in present else columns.answer
        raise DataError(f"{where}: no answer in {column}; mark an unanswerable question (SQuAD v2) with a true "
                        f"no-answer column (dataset.columns.no_answer={columns.no_answer})")
    return Question(qid, question, context, texts, starts)


def questions_from_records(records: Iterable[tuple[str, Any]], columns: Columns | None, source: str,
                           with_answers: bool = True) -> list[Question]:
    """`(where, record)` pairs (a reader's, or a hub split's) as questions: the mapped columns must exist, ids must
    be unique, and there must be at least one question. `source` names the data in errors."""
    if columns is None:
        raise ConfigError(f"{source}: records need a column mapping, dataset.columns (conf/dataset/squad_v1.yaml)")
    records = list(records)
    if not records:
        raise DataError(f"{source}: holds no questions")
    present = _columns_of(records, source)
    required = [("context", columns.context), ("question", columns.question)]
    if with_answers and columns.answers not in present:
        required.append(("answer", columns.answer))
    for field, column in required:
        if column not in present:
            option = "dataset.columns.answers or .answer" if field == "answer" else f"dataset.columns.{field}"
            raise DataError(f"{source}: no column {column!r} for the {field} ({option}); its columns: "
                            f"{', '.join(sorted(present)) or 'none'}")
    questions, seen = [], {}
    for n, (where, record) in enumerate(records, 1):
        question = to_question(record, columns, present, f"{source}: {where}", f"row-{n}", with_answers)
        if question.id in seen:
            raise DataError(f"{source}: {where}: duplicate id {question.id!r} (first at {seen[question.id]})")
        seen[question.id] = where
        questions.append(question)
    return questions


_READERS = {".jsonl": _jsonl_records, ".json": _json_list_records, ".csv": _csv_records, ".parquet": _parquet_records}


def read_data_file(path: str | Path, columns: Columns | None, with_answers: bool = True,
                   option: str = "dataset.validation_file") -> tuple[str | None, list[Question]]:
    """A data file's SQuAD version (official SQuAD JSON says it; records do not: None) and its questions.
    `.json`: official SQuAD (an object) or a list of records; `.jsonl`, `.csv`, `.parquet`: records. `option` is
    the setting that named the file, for the error when it is missing."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise DataError(f"{option}={path}: unknown format {suffix or '(no extension)'!r}: expected one of "
                        f"{', '.join(_READERS)} (.json: official SQuAD, or a list of records)")
    try:
        with open(path, "rb") as f:
            first = f.read(64).lstrip()[:1]
        if suffix == ".json" and first != b"[":
            return read_squad_file(path)
        return None, questions_from_records(_READERS[suffix](path), columns, str(path), with_answers)
    except FileNotFoundError:
        raise DataError(f"{option}={path}: cannot read it (no such file)") from None
    except IsADirectoryError:
        raise DataError(f"{option}={path}: a directory, not a data file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None


def read_hub(hub_id: str, config: str | None, split: str, columns: Columns | None) -> list[Question]:
    """A split of a dataset through `datasets.load_dataset(hub_id, config)`: a hub id, or a local dataset dir
    (its README's `configs`), mapped by the same columns as local records."""
    import datasets

    source = f"{hub_id}" + (f" ({config})" if config else "") + f"[{split}]"
    try:
        rows = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # offline, unknown id or config, no such split: all need the same advice
        raise DataError(
            f"could not load {source} through datasets.load_dataset ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}). Without hub access, point at local files: "
            f"dataset.train_file=... dataset.validation_file=... (SQuAD JSON, JSONL, CSV or Parquet)"
        ) from None
    return questions_from_records(((f"row {n}", row) for n, row in enumerate(rows, 1)), columns, source)
