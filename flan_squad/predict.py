"""Answer questions: `python -m flan_squad.predict run_dir=... question="..." context="..."`.

From a training run (full model or adapter + base, as trained), or a hub/local model dir (an export, say:
`model.name_or_path=DIR model.init=pretrained model.tokenizer=null`). One question prints its answer;
`input_file=` (records with a question and a context, and optionally an id: JSONL, a JSON list, CSV or Parquet, the
columns named by `dataset.columns`; or an official SQuAD file) writes `{id: answer}` JSON. Answers go through the
evaluation path with the run's own answering settings (`flan_squad.runs.answering`, as `flan_squad.serve` answers), and
the no-answer threshold ("" means no answer).
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from flan_squad.data.prompts import UNANSWERABLE
from flan_squad.data.records import Columns, read_data_file
from flan_squad.data.squad import Question
from flan_squad.runs.answering import Answerer
from flan_squad.utils.config import register_resolvers
from flan_squad.utils.errors import ConfigError, exit_on_error
from flan_squad.utils.files import write_json_atomic


def predict(cfg: DictConfig) -> dict[str, str]:
    single = cfg.question is not None or cfg.context is not None
    if single == (cfg.input_file is not None):
        raise ConfigError("give either question=... context=... or input_file=... (not both)")
    if single and not (cfg.question and cfg.context):
        raise ConfigError("question=... and context=... both need text")
    if cfg.input_file:
        columns = Columns.from_config(cfg.dataset.columns)
        questions = read_data_file(cfg.input_file, columns, with_answers=False, option="input_file")[1]
    else:
        questions = [Question("question", str(cfg.question), str(cfg.context), ())]
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
