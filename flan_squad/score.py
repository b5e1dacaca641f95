"""Score a predictions file like the official SQuAD scripts: `python -m flan_squad.score DATA PRED`.

A drop-in for `evaluate-v1.1.py` / `evaluate-v2.0.py`: the SQuAD version is read from the data file, and
the printed JSON has the official script's keys, values and layout (v1.1: `exact_match`, `f1`; v2.0:
`exact`, `f1`, `total`, `HasAns_*`, `NoAns_*`, and `best_*` with `--na-prob-file`). The numbers come
from `flan_squad.evaluation.metrics`, the one implementation of the official rules that training and evaluation use.
Your own records (`.jsonl`, `.csv`, `.parquet`, a `.json` list; docs/data.md) score too: `--version v1|v2` and
`--column FIELD=NAME` as `dataset.columns` maps them.

Unlike the official scripts, a question without a prediction is an error (v1.1 would score it 0, v2.0
would drop it from the total and then crash); `--allow-missing` scores each such question as wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path

from flan_squad.data.records import Columns, read_data_file
from flan_squad.evaluation.metrics import ScoreError, score
from flan_squad.utils.config import CONFIG_DIR
from flan_squad.utils.errors import FlanSquadError, print_error
from flan_squad.utils.files import write_json_atomic


def read_json_object(path: str | Path, what: str, value_type: type | tuple) -> dict:
    """Read `{question_id: value}` JSON, naming the file and the first bad entry on error."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ScoreError(f"{path}: no such {what} file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScoreError(f"{path}: not a UTF-8 JSON {what} file ({e})") from None
    if not isinstance(data, dict):
        raise ScoreError(f"{path}: expected a JSON object {{question_id: {what}}}, found {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(value, value_type) or isinstance(value, bool):
            raise ScoreError(f"{path}: the {what} for {key!r} is {type(value).__name__} ({value!r:.40})")
    return data


def check_probabilities(path: str | Path, na_probs: Mapping[str, float]) -> None:
    """No-answer probabilities are in [0, 1]: anything else (NaN included) would move the best threshold silently."""
    for key, value in na_probs.items():
        if not 0 <= value <= 1:
            raise ScoreError(f"{path}: the no-answer probability for {key!r} is {value}: expected a number in [0, 1]")


def columns(assignments: list[str]) -> Columns:
    """The column mapping of conf/dataset (dataset.columns) with `FIELD=NAME` assignments applied (NAME null: none)."""
    from omegaconf import OmegaConf

    mapping = dict(OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "dataset" / "squad_v1.yaml").columns))
    for assignment in assignments:
        field, sep, name = assignment.partition("=")
        if not sep or field not in mapping:
            raise ScoreError(f"--column {assignment}: expected FIELD=NAME with FIELD one of {', '.join(mapping)}")
        mapping[field] = None if name == "null" else name
    return Columns.from_config(mapping)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flan_squad.score",
        description="Score SQuAD v1.1/v2.0 predictions exactly like the official evaluation scripts.",
    )
    parser.add_argument("data_file", help="official-format SQuAD JSON (its version picks the rules), or records "
                        "(.jsonl, .csv, .parquet, a .json list) with --version")
    parser.add_argument("--version", choices=["v1", "v2"], help="records: the SQuAD rules to score with")
    parser.add_argument("--column", action="append", default=[], metavar="FIELD=NAME",
                        help="records: the column that holds FIELD (as dataset.columns.FIELD; repeat for each)")
    parser.add_argument("pred_file", help="predictions JSON: {question_id: answer}, \"\" for no answer")
    parser.add_argument("--na-prob-file", "-n", help="v2.0: {question_id: probability of no answer}")
    parser.add_argument("--na-prob-thresh", "-t", type=float, default=1.0,
                        help="v2.0: predict \"\" where the no-answer probability exceeds this (default 1.0)")
    parser.add_argument("--out-file", "-o", help="write the scores JSON here instead of stdout")
    parser.add_argument("--allow-missing", action="store_true",
                        help="score questions without a prediction as wrong instead of failing")
    args = parser.parse_args(argv)
    try:
        version, questions = read_data_file(args.data_file, columns(args.column), option="data_file")
        if version is None and args.version is None:
            raise ScoreError(f"{args.data_file}: records do not say their SQuAD version: pass --version v1 or v2")
        if args.version and version not in (None, args.version):
            raise ScoreError(f"--version {args.version}: {args.data_file} is SQuAD {version} data")
        version = version or args.version
        if version == "v1" and any(not q.answers for q in questions):
            raise ScoreError(f"{args.data_file}: has unanswerable questions: score with --version v2")
        predictions = read_json_object(args.pred_file, "prediction", str)
        na_probs = None
        if args.na_prob_file:
            if version != "v2":
                raise ScoreError(f"--na-prob-file: {args.data_file} is SQuAD v1.1 data, which has no no-answer scores")
            na_probs = read_json_object(args.na_prob_file, "no-answer probability", (int, float))
            check_probabilities(args.na_prob_file, na_probs)
        result = score(version, questions, predictions, na_probs, na_prob_thresh=args.na_prob_thresh,
                       missing="wrong" if args.allow_missing else "refuse")
    except FlanSquadError as e:  # a DataError or a ScoreError: the message names the file
        print_error(e)
        return 2
    missing = sum(q.id not in predictions for q in questions)
    if missing:
        print(f"{missing} of {len(questions)} questions had no prediction and were scored as wrong", file=sys.stderr)
    if version == "v1":  # the v1.1 script's own keys
        result = {"exact_match": result["exact"], "f1": result["f1"]}
    if args.out_file:
        write_json_atomic(args.out_file, result)
    else:  # the official scripts' layouts: v1.1 on one line, v2.0 indented
        print(json.dumps(result) if version == "v1" else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
