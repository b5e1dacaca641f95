"""Answer questions: `python -m flan_squad.predict run_dir=... question="..." context="..."`.

From a training run (full model or adapter + base, as trained), or a hub/local model dir (an export, say:
`model.name_or_path=DIR model.init=pretrained model.tokenizer=null`). One question prints its answer;
`input_file=` (records with a question and a context, and optionally an id: JSONL, a JSON list, CSV or Parquet, the
columns named by `dataset.columns`; or an official SQuAD file) writes `{id: answer}` JSON. Answers go through the
evaluation path: context windows, best window, snapping ("" means no answer).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from flan_squad.utils.config import register_resolvers  # noqa: E402
from flan_squad.utils.precision import check_precision  # noqa: E402
from flan_squad.utils.errors import ConfigError, exit_on_error  # noqa: E402
from flan_squad.utils.files import write_json_atomic  # noqa: E402
from flan_squad.evaluation.inference import answer_questions  # noqa: E402
from flan_squad.runs.restore import restore  # noqa: E402
from flan_squad.data.prompts import UNANSWERABLE  # noqa: E402
from flan_squad.data.records import Columns, read_data_file  # noqa: E402
from flan_squad.data.squad import Question  # noqa: E402


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
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    precision = check_precision(cfg.precision, "precision")
    if precision not in ("bf16-mixed", "32-true", "32"):
        raise ConfigError(f"precision={precision}: expected bf16-mixed or 32-true")
    restored = restore(cfg, device)
    # bf16-mixed as Lightning runs it in evaluation: autocast around the model, weights kept as loaded.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        answers = answer_questions(restored.model, restored.tokenizer, questions, restored.version,
                                   cfg.dataset.max_source_length, cfg.eval.stride, cfg.batch_size,
                                   cfg.eval.max_new_tokens, cfg.eval.snap_to_context, prompt=restored.base.prompt,
                                   num_beams=cfg.eval.num_beams)
    return answers.predictions


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
