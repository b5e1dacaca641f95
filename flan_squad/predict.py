"""Answer questions: `python -m flan_squad.predict run_dir=... question="..." context="..."`.

From a training run (full model or adapter + base, as trained), or a hub/local model dir (an export, say:
`model.name_or_path=DIR model.init=pretrained model.tokenizer=null`). One question prints its answer;
`input_file=` (JSON list or JSONL of `{id, question, context}`) writes `{id: answer}` JSON. Answers go
through the evaluation path, with the run's own answering settings (`flan_squad.runs.answering`, as
`flan_squad.serve` answers): context windows, best window, snapping, the no-answer threshold ("" means no answer).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from flan_squad.utils.config import register_resolvers  # noqa: E402
from flan_squad.utils.errors import ConfigError, exit_on_error  # noqa: E402
from flan_squad.utils.files import write_json_atomic  # noqa: E402
from flan_squad.runs.answering import Answerer  # noqa: E402
from flan_squad.data.prompts import UNANSWERABLE  # noqa: E402
from flan_squad.data.squad import DataError, Question  # noqa: E402


def read_questions(path: str | Path) -> list[Question]:
    """`{id, question, context}` records from a JSON list or a JSONL file; errors name the record."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"input_file={path}: cannot read it ({e})") from None
    try:
        records = json.loads(text)
        where = [f"{path}[{i}]" for i in range(len(records))] if isinstance(records, list) else []
        if not isinstance(records, list):
            raise DataError(f"input_file={path}: expected a JSON list (or JSONL) of {{id, question, context}}")
    except json.JSONDecodeError:
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"input_file={path}: line {n} is not JSON ({e.msg})") from None
                where.append(f"{path}:{n}")
    questions, seen = [], set()
    for record, at in zip(records, where):
        if not isinstance(record, dict):
            raise DataError(f"{at}: expected an object {{id, question, context}}, found {type(record).__name__}")
        for key in ("id", "question", "context"):
            if not isinstance(record.get(key), (str, int)) or isinstance(record.get(key), bool):
                raise DataError(f"{at}: missing or non-text {key!r}")
        qid = str(record["id"])
        if qid in seen:
            raise DataError(f"{at}: duplicate id {qid!r}")
        seen.add(qid)
        questions.append(Question(qid, str(record["question"]), str(record["context"]), ()))
    if not questions:
        raise DataError(f"input_file={path}: holds no questions")
    return questions


def predict(cfg: DictConfig) -> dict[str, str]:
    single = cfg.question is not None or cfg.context is not None
    if single == (cfg.input_file is not None):
        raise ConfigError("give either question=... context=... or input_file=... (not both)")
    if single and not (cfg.question and cfg.context):
        raise ConfigError("question=... and context=... both need text")
    questions = (read_questions(cfg.input_file) if cfg.input_file
                 else [Question("question", str(cfg.question), str(cfg.context), ())])
    return Answerer.from_config(cfg).answer(questions).predictions


register_resolvers()  # conf/ uses them; Hydra resolves the config inside main


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with exit_on_error():
        predictions = predict(cfg)
    if cfg.input_file is None:
        print(predictions["question"] or UNANSWERABLE)
    elif cfg.output_file:
        write_json_atomic(cfg.output_file, predictions)
        print(f"{len(predictions)} answers written to {cfg.output_file}", file=sys.stderr)
    else:
        print(json.dumps(predictions, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
