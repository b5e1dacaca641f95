"""Export a run as a standalone Hugging Face model: `python -m flan_squad.export run_dir=... output_dir=...`.

The result loads with `AutoModelForSeq2SeqLM.from_pretrained(output_dir)` (tokenizer and model card, README.md,
beside it) and needs neither PEFT nor this project: the run's strategy makes it (`Strategy.export`). Adapters
are merged into a full-precision reload of their base, even when the run trained on a 4-bit base (QLoRA:
merging into 4-bit weights would round the update away), so a QLoRA export computes W + BA where the run
computed dequant(NF4(W)) + BA: answers can differ slightly.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from flan_squad.runs.lock import check_directory, hold
from flan_squad.runs.model_card import command_line, run_command, write_model_card
from flan_squad.runs.restore import RunError, build_parts, restore_weights, run_config
from flan_squad.utils.config import register_resolvers
from flan_squad.utils.errors import exit_on_error
from flan_squad.utils.files import read_json, write_dir_atomic, write_json_atomic


def export(run_dir: str | Path, output_dir: str | Path) -> Path:
    with hold(check_directory(output_dir, "output_dir")):  # checked before the (slow) merge; one writer
        return _export(Path(run_dir), Path(output_dir))


def _export(run_dir: Path, output_dir: Path) -> Path:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        # never overwrite; and a dir holding adapter files would re-apply them on load
        raise RunError(f"output_dir={output_dir}: exists and is not empty; export into a new dir")
    cfg = run_config(run_dir)
    parts = build_parts(cfg, run_dir)
    base, strategy, tokenizer = parts.base, parts.strategy, parts.tokenizer
    model = restore_weights(run_dir, lambda directory: strategy.export(directory, base))
    metrics = read_json(run_dir / "metrics.json")  # for the model card; a run copied without it gets none

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        if (staging / "adapter_config.json").exists():  # transformers would re-apply it on load: not standalone
            raise RuntimeError(f"strategy {strategy.name!r}: export() returned a model with adapters, not merged")
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / "flan_squad_export.json", {
            "run_dir": str(run_dir.resolve()), "strategy": strategy.name, "base": base.label,
            "approach": strategy.describe(),
            "squad_version": cfg.dataset.version,  # the prompt it was trained with: predict dataset=squad_<v>
            "prompt": base.prompt,  # ... in this format: model.prompt=<it> when loading it as model.name_or_path
            "no_answer": base.no_answer,  # ... and model.no_answer=<it>
            "note": strategy.export_note,  # null: it computes what the run scored
        })
        if metrics:
            write_model_card(staging, metrics, cfg, run_command(run_dir), exported_by=command_line())

    write_dir_atomic(output_dir, write)  # replaces an empty output_dir (checked above)
    return output_dir


register_resolvers()  # conf/ uses them; Hydra resolves the config inside main


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    with exit_on_error():
        path = export(cfg.run_dir, cfg.output_dir)
    print(f"exported {cfg.run_dir} to {path}: AutoModelForSeq2SeqLM.from_pretrained({str(path)!r})")
    note = json.loads((path / "flan_squad_export.json").read_text())["note"]
    if note:
        print(f"NOTE: {note}")


if __name__ == "__main__":
    main()
