"""The model card saved with every model: `<run dir>/model/README.md`, and the README.md of an export.

Hugging Face's model-card format, written and parsed back by huggingface_hub's `ModelCard` / `ModelCardData` /
`EvalResult` (which check the `model-index` block as the hub reads it): metadata (base model, datasets, library, tags,
and the scores with their split) and a short text: the strategy and its settings, the training data and
budget, the scores, the command that made the model, and the note every result from random-init or
self-trained weights must carry. Written from what the run recorded (`metrics.json`, `config.yaml`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from flan_squad.runs.results import weights_note
from flan_squad.utils.files import write_file_atomic
from flan_squad.utils.process import in_multirun

CARD = "README.md"
SCORES = (("exact", "exact_match", "Exact match"), ("f1", "f1", "F1"), ("HasAns_f1", "f1", "F1 (answerable)"),
          ("NoAns_f1", "f1", "F1 (unanswerable)"), ("best_f1", "f1", "Best F1 (tuned no-answer threshold)"))


def command_line(hydra_cfg: Any = None) -> str | None:
    """The command that runs this job alone: its entry point and its own overrides (a sweep job's values).
    `hydra_cfg`: a run's saved `.hydra/hydra.yaml` node; default: the running job's."""
    if hydra_cfg is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
    name, overrides = hydra_cfg.job.name, list(hydra_cfg.overrides.task)
    if in_multirun(hydra_cfg):  # this one job, not its sweep again (hparams_search=...)
        overrides.append("hydra.mode=RUN")
    return " ".join(["python -m", f"flan_squad.{name}", *overrides]) if name else None


def run_command(run_dir: str | Path) -> str | None:
    """The command that made a run, from the Hydra record in its dir (None if it kept none)."""
    from omegaconf import OmegaConf

    saved = Path(run_dir) / ".hydra" / "hydra.yaml"
    return command_line(OmegaConf.load(saved).hydra) if saved.is_file() else None


def write_model_card(directory: str | Path, metrics: dict[str, Any], config: Any, command: str | None,
                     exported_by: str | None = None) -> Path:
    """Write `directory/README.md` for the model saved there. `metrics`: the run's metrics.json; `config`: its
    resolved config (config.yaml); `command`: what trained it; `exported_by`: the export command, for an export."""
    from omegaconf import OmegaConf

    directory = Path(directory)
    cfg = OmegaConf.to_container(OmegaConf.create(config), resolve=True) if not isinstance(config, dict) else config
    adapter = (directory / "adapter_config.json").is_file()
    path = directory / CARD
    card = str(ModelCard(_card(metrics, cfg, command, adapter, exported_by)))  # parsed first: a bad card fails here
    write_file_atomic(path, lambda f: f.write(card.encode("utf-8")))  # a full disk leaves no half card in model/
    return path


def _card(m: dict[str, Any], cfg: dict[str, Any], command: str | None, adapter: bool, exported_by: str | None) -> str:
    model, dataset, strategy = cfg.get("model", {}), cfg.get("dataset", {}), cfg.get("strategy", {})
    note = weights_note(m)
    base_id = _hub_id(model)
    official = str(dataset.get("name", "")).startswith("squad")  # the planted tasks are not a hub dataset
    approach = (m.get("approach") or {}).get("label") or m.get("strategy")
    name = f"{m.get('model')}-{approach}-{m.get('dataset')}".replace(" ", "").replace("=", "")
    evaluated_on = _evaluated_on(m, dataset)
    tags = ["flan-squad", "question-answering", "t5", str(m.get("strategy"))]
    tags += ["random-init"] if m.get("init") == "random" else []
    task = dict(task_type="question-answering", task_name="Extractive question answering",
                dataset_type=dataset.get("hub_id") if official else str(m.get("dataset")),
                dataset_name=f"SQuAD {m.get('squad_version')} ({m.get('dataset')}): {evaluated_on}",
                dataset_split="validation")
    metadata = ModelCardData(
        base_model=base_id, datasets=[dataset["hub_id"]] if official and dataset.get("hub_id") else None,
        language=["en"], library_name="peft" if adapter else "transformers", pipeline_tag="text2text-generation",
        tags=tags, model_name=name,
        eval_results=[EvalResult(**task, metric_type=kind, metric_name=title, metric_value=round(float(m[key]), 2))
                      for key, kind, title in SCORES if m.get(key) is not None])
    train_source = (Path(str(dataset["train_file"])).name if dataset.get("train_file")
                    else f"{dataset.get('hub_id')}[train]")
    settings = ", ".join(f"{k}={v}" for k, v in strategy.items() if not k.startswith("_"))
    origin = "random init" if m.get("init") == "random" else model.get("name_or_path")
    base = f"`{base_id}`" if base_id else f"{m.get('model')} ({origin})"
    merged = ", exported as one standalone transformers model" + (
        " (adapters merged into the base)" if _adapters_merged(m) else "") if exported_by else ""
    scores = f"exact match {m['exact']:.2f}, F1 {m['f1']:.2f} on {evaluated_on}"
    if m.get("HasAns_f1") is not None:
        scores += f" (answerable F1 {m['HasAns_f1']:.2f}" + (f", unanswerable F1 {m['NoAns_f1']:.2f})"
                                                              if m.get("NoAns_f1") is not None else ")")
    lines = [
        "---", metadata.to_yaml(), "---", "",
        f"# {name}", "",
        *([f"> **Note: {note}.**", ""] if note else []),
        f"{'A PEFT adapter' if adapter else 'A sequence-to-sequence model'} for SQuAD {m.get('squad_version')} "
        f"question answering, trained with flan-squad ({approach}) from {base}{merged}.",
        "",
        f"- **Strategy**: {approach}; {settings}",
        (f"- **Training data**: {m.get('train_examples')} questions of {train_source}, {m.get('epochs')} epochs, "
         f"{m.get('optimizer_steps')} optimizer steps of batch {m.get('batch_size')}, seed {m.get('seed')}"),
        (f"- **Budget**: {m.get('train_time_s')} s of training on {m.get('device')} ({m.get('precision')}), "
         f"peak memory {m.get('peak_memory_mb')} MB ({m.get('peak_memory_kind')}); "
         f"{m.get('trainable_params'):,} trainable of {m.get('total_params'):,} parameters"),
        f"- **Scores** (official SQuAD rules): {scores}",
        f"- **Made by**: `{command or 'not recorded (no Hydra record in the run dir)'}`",
        *([f"- **Exported by**: `{exported_by}`"] if exported_by else []),
        "",
        "## Use", "", "```python",
        *(["from peft import AutoPeftModelForSeq2SeqLM", "from transformers import AutoTokenizer", "",
           'model = AutoPeftModelForSeq2SeqLM.from_pretrained("<this dir>")  # loads its base as the adapter names it']
          if adapter else
          ["from transformers import AutoModelForSeq2SeqLM, AutoTokenizer", "",
           'model = AutoModelForSeq2SeqLM.from_pretrained("<this dir>")']),
        'tokenizer = AutoTokenizer.from_pretrained("<this dir>")',
        "```", "",
        f"It answers questions posed with flan-squad's SQuAD {m.get('squad_version')} prompt in the "
        f"`{model.get('prompt', 'flan')}` format (`model.prompt`"
        + (f", `model.no_answer={model['no_answer']}`" if model.get("no_answer", "format") != "format" else "")
        + "), which `python -m flan_squad.predict` builds.",
        "",
    ]
    return "\n".join(lines)


def _adapters_merged(m: dict[str, Any]) -> bool:
    """Whether the run trained only part of its model (adapters), which an export merges into the base."""
    return m.get("trainable_params") is not None and m.get("trainable_params") < m.get("total_params", 0)


def _hub_id(model: dict[str, Any]) -> str | None:
    """The base's Hugging Face id, when it has one: not for random init, nor a base trained here (a local dir)."""
    source = model.get("name_or_path")
    if model.get("init") != "pretrained" or not source or str(source).startswith(("/", ".", "~")):
        return None
    return None if Path(str(source)).exists() else str(source)


def _evaluated_on(m: dict[str, Any], dataset: dict[str, Any]) -> str:
    """e.g. "32 questions (a seeded sample) of dev-v2.0.json": the validation split the scores are from."""
    source = m.get("split") or dataset.get("validation_file") or f"{dataset.get('hub_id')}[validation]"
    sample = " (a seeded sample)" if dataset.get("limit_val") else ""
    return f"{m.get('total')} questions{sample} of {Path(str(source)).name}"
