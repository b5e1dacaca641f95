"""Your own data (flan_squad.data.records, docs/data.md): every format, and a dataset through `datasets.load_dataset`
with a config name, reads the same questions through one column mapping; malformed records name their file and row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DEV_V2, compose_config
from flan_squad.data.records import Columns, read_data_file, read_hub
from flan_squad.data.squad import DataError, Question, read_squad_file
from flan_squad.utils.errors import ConfigError

# A user's own names for each field: one answer per row, an explicit no-answer flag.
RENAMED = {"id": "qid", "context": "passage", "question": "query", "answer": "gold", "answer_start": "gold_start",
           "no_answer": "unanswerable"}


@pytest.fixture(scope="module")
def default_columns(tmp_path_factory) -> dict:
    """conf/dataset's mapping (SQuAD's own column names), as a run composes it."""
    return dict(compose_config([], output_dir=tmp_path_factory.mktemp("cfg")).dataset.columns)


@pytest.fixture(scope="module")
def questions() -> list[Question]:
    """Real SQuAD v2.0 dev questions: answerable ones with several gold answers, and unanswerable ones."""
    dev = read_squad_file(DEV_V2)[1]
    chosen = [q for q in dev if len(set(q.answers)) > 1][:12] + [q for q in dev if not q.answers][:8]
    assert len(chosen) == 20
    return chosen


def flat_rows(questions: list[Question]) -> list[dict]:
    """One row per question under the RENAMED columns, as a spreadsheet holds them: the first answer only."""
    return [{"qid": q.id, "passage": q.context, "query": q.question, "gold": q.answers[0] if q.answers else None,
             "gold_start": q.answer_starts[0] if q.answers else None, "unanswerable": "no" if q.answers else "yes"}
            for q in questions]


def hub_rows(questions: list[Question]) -> list[dict]:
    """Rows as SQuAD's hub datasets hold them: `answers` is {"text": [...], "answer_start": [...]}."""
    return [{"id": q.id, "title": q.title, "context": q.context, "question": q.question,
             "answers": {"text": list(q.answers), "answer_start": list(q.answer_starts)}} for q in questions]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def hub_dir(path: Path, files: dict[str, dict[str, str]]) -> Path:
    """A dataset dir as the hub lays one out: data files, and a README whose `configs` name them per config."""
    path.mkdir(parents=True, exist_ok=True)
    lines = ["---", "configs:"]
    for config, splits in files.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {name}" for split, name in splits.items()]
    (path / "README.md").write_text("\n".join(lines + ["---", ""]), encoding="utf-8")
    return path


def test_every_format_reads_the_same_questions_through_the_mapping(questions, default_columns, tmp_path):
    renamed = Columns.from_config({**default_columns, **RENAMED})
    flat = flat_rows(questions)
    expected = [Question(q.id, q.question, q.context, q.answers[:1], q.answer_starts[:1]) for q in questions]
    for path in (write_csv(tmp_path / "d.csv", flat), write_jsonl(tmp_path / "d.jsonl", flat),
                 write_parquet(tmp_path / "d.parquet", flat)):
        (tmp_path / "d.json").write_text(json.dumps(flat), encoding="utf-8")
        for file in (path, tmp_path / "d.json"):
            version, read = read_data_file(file, renamed)
            assert version is None and read == expected, file  # records carry no version: dataset.version decides

    # SQuAD's hub layout, with every gold answer and its offset: the same questions as the official JSON file
    squad = Columns.from_config(default_columns)
    rows = hub_rows(questions)
    for path in (write_jsonl(tmp_path / "h.jsonl", rows), write_parquet(tmp_path / "h.parquet", rows)):
        assert read_data_file(path, squad)[1] == [Question(q.id, q.question, q.context, q.answers, q.answer_starts)
                                                   for q in questions]


def test_a_dataset_with_a_config_name_loads_through_datasets_load_dataset(questions, default_columns, tmp_path):
    # The hub path (dataset.hub_id + dataset.hub_config): the same datasets.load_dataset call, here on a local
    # dataset dir with two configs (one file format per dataset, as on the hub), since the hub is not reachable here.
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "squad.jsonl", hub_rows(questions))
    renamed_file = write_jsonl(tmp_path / "hub" / "renamed.jsonl", flat_rows(questions))
    root = hub_dir(tmp_path / "hub", {"squad": {"validation": "squad.jsonl"},
                                      "renamed": {"validation": "renamed.jsonl"}})
    squad = read_hub(str(root), "squad", "validation", Columns.from_config(default_columns))
    assert squad == [Question(q.id, q.question, q.context, q.answers, q.answer_starts) for q in questions]
    renamed = Columns.from_config({**default_columns, **RENAMED})
    assert read_hub(str(root), "renamed", "validation", renamed) == read_data_file(renamed_file, renamed)[1]
    with pytest.raises(DataError, match=r"could not load .*\(nope\)\[validation\].*dataset.train_file="):
        read_hub(str(root), "nope", "validation", Columns.from_config(default_columns))


def test_ids_are_row_numbers_when_the_data_has_none_and_lists_in_a_csv_cell_are_json(default_columns, tmp_path):
    path = write_csv(tmp_path / "d.csv", [
        {"context": "Paris is in France.", "question": "Where is Paris?", "answers": '["France", "in France"]'},
        {"context": "Rome is old.", "question": "How is Rome?", "answers": "[]"}])
    read = read_data_file(path, Columns.from_config(default_columns))[1]
    assert [(q.id, q.answers, q.answer_starts) for q in read] == [("row-1", ("France", "in France"), (-1, -1)),
                                                                   ("row-2", (), ())]  # [] says "no answer"


def _bad(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


HEADER = "qid,passage,query,gold,gold_start,unanswerable\n"


@pytest.mark.parametrize("name, text, message", [
    ("d.csv", HEADER + "a,Ctx.,Q?,Ctx,0,no\nb,Ctx.,Q?,,,no\n",
     "row 2 (line 3): no answer in gold; mark an unanswerable question (SQuAD v2) with a true no-answer column "
     "(dataset.columns.no_answer=unanswerable)"),
    ("d.csv", HEADER + 'a,"Two\nlines.",Q?,Two,0,no\nb,Ctx.,Q?,Ctx,0,maybe\n',
     "row 2 (line 4): unanswerable='maybe': expected true/false"),
    ("d.csv", HEADER + "a,Ctx.,Q?,Ctx,0,yes\n", "row 1 (line 2): marked unanswerable (unanswerable) but has an answer"),
    ("d.csv", HEADER + "a,Ctx.,Q?,Ctx,0,no\na,Ctx.,Q?,Ctx,0,no\n", "row 2 (line 3): duplicate id 'a' (first at row 1"),
    ("d.csv", HEADER + "a,Ctx.,Q?,Ctx,0\n", "row 1 (line 2): 5 fields, the header has 6"),
    ("d.csv", HEADER + "a,Ctx.,Q?,Ctx,zero,no\n", "row 1 (line 2): gold_start='zero': expected a character offset"),
    ("d.csv", "qid,context,query,gold\na,Ctx.,Q?,Ctx\n",
     "no column 'passage' for the context (dataset.columns.context); its columns: context, gold, qid, query"),
    ("d.csv", "qid,passage,query\na,Ctx.,Q?\n",
     "no column 'gold' for the answer (dataset.columns.answers or .answer)"),
    ("d.csv", HEADER, "holds no questions"),
    ("d.jsonl", '{"qid": "a", "passage": "C.", "query": "Q?", "gold": "C"}\n\n{"qid": "b", "passage": 3\n',
     "row 2 (line 3): not JSON"),
    ("d.jsonl", '{"qid": "a", "passage": ["C."], "query": "Q?", "gold": "C"}\n', "row 1 (line 1): passage is list"),
    ("d.jsonl", '["a", "C.", "Q?"]\n', "row 1 (line 1): expected a record (an object of columns), found list"),
    ("d.json", '[{"qid": "a", "passage": "C.", "query": "Q?", "answers": "C"}]',
     "row 1: answers is str, expected a list of answer texts"),
    ("d.parquet", "not parquet", "not a Parquet file"),
    ("d.txt", "qid,passage", "unknown format '.txt'"),
])
def test_malformed_records_name_the_file_and_row(tmp_path, default_columns, name, text, message):
    path = _bad(tmp_path, name, text)
    with pytest.raises(DataError) as error:
        read_data_file(path, Columns.from_config({**default_columns, **RENAMED}))
    assert str(path) in str(error.value) and message in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


def test_a_bad_mapping_is_a_one_line_error_naming_the_option(default_columns, tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.columns.passage: not a field \(the fields: context, question"):
        Columns.from_config({**default_columns, "passage": "p"})
    with pytest.raises(ConfigError, match="dataset.columns.context: must name the column"):
        Columns.from_config({**default_columns, "context": None})
    with pytest.raises(DataError, match=r"dataset.train_file=.*nope.csv: cannot read it \(no such file\)"):
        read_data_file(tmp_path / "nope.csv", Columns.from_config(default_columns), option="dataset.train_file")


def test_v1_refuses_unanswerable_records_and_names_the_version_option(questions, default_columns, tmp_path, tokenizer):
    from flan_squad.data.datamodule import SquadDataModule

    path = write_csv(tmp_path / "d.csv", flat_rows(questions))
    columns = {**default_columns, **RENAMED}
    datamodule = SquadDataModule(tokenizer, "records", "v1", None, validation_file=str(path), columns=columns)
    with pytest.raises(DataError, match=r"d.csv: has unanswerable questions; .*dataset.version=v2"):
        datamodule.setup("validate")
    datamodule = SquadDataModule(tokenizer, "records", "v2", None, validation_file=str(path), columns=columns)
    datamodule.setup("validate")
    assert [q.id for q in datamodule.val_questions] == [q.id for q in questions]
    assert sum(not q.answers for q in datamodule.val_questions) == 8
