"""The model card (`flan_squad/runs/model_card.py`) read back through huggingface_hub's own parser, as the hub and
`ModelCard.load` read it: its metadata, the `model-index` scores as `EvalResult`s, and the note on random weights.
(`ModelCard.validate` asks the hub itself: not reachable here.)"""

from __future__ import annotations

from huggingface_hub import ModelCard

from conftest import compose_config
from flan_squad.runs.model_card import write_model_card

# metrics.json of a SQuAD v2 LoRA run, as train.py writes it (the keys the card reads)
METRICS = {"exact": 12.5, "f1": 20.123, "total": 8, "HasAns_f1": 10.0, "NoAns_f1": 33.333, "best_f1": 37.5,
           "strategy": "lora", "approach": {"label": "lora r=16", "capacity": 16}, "model": "t5-tiny",
           "init": "random", "model_note": None, "dataset": "squad_v2", "squad_version": "v2", "train_examples": 8,
           "epochs": 1, "optimizer_steps": 1, "batch_size": 8, "seed": 42, "train_time_s": 1.5, "device": "cpu",
           "precision": "32-true", "peak_memory_mb": 900.0, "peak_memory_kind": "rss", "trainable_params": 6144,
           "total_params": 4316160, "split": "dev-v2.0.reconstructed.json"}


def test_the_card_is_what_huggingface_hub_parses(tmp_path):
    config = compose_config(["experiment=smoke", "strategy=lora", "dataset=squad_v2", "dataset.limit_val=8"])
    (tmp_path / "adapter_config.json").write_text("{}")
    write_model_card(tmp_path, METRICS, config, "python -m flan_squad.train experiment=smoke strategy=lora")
    card = ModelCard.load(tmp_path / "README.md")  # raises on a model-index it cannot parse

    data = card.data
    assert (data.library_name, data.pipeline_tag, data.datasets) == ("peft", "text2text-generation",
                                                                     ["rajpurkar/squad_v2"])
    assert data.base_model is None and "random-init" in data.tags  # random weights claim no base model
    assert data.model_name == "t5-tiny-lorar16-squad_v2"
    scores = {r.metric_name: (r.metric_type, r.metric_value) for r in data.eval_results}
    assert scores == {"Exact match": ("exact_match", 12.5), "F1": ("f1", 20.12), "F1 (answerable)": ("f1", 10.0),
                      "F1 (unanswerable)": ("f1", 33.33), "Best F1 (tuned no-answer threshold)": ("f1", 37.5)}
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in data.eval_results} == {
        ("question-answering", "rajpurkar/squad_v2", "validation")}
    assert "8 questions (a seeded sample) of dev-v2.0.reconstructed.json" in data.eval_results[0].dataset_name
    assert "random-init weights: these scores say nothing about FLAN-T5" in card.text
    assert "`python -m flan_squad.train experiment=smoke strategy=lora`" in card.text


def test_a_pretrained_base_is_named_and_a_generated_task_is_no_hub_dataset(tmp_path):
    config = compose_config(["model=flan_t5_small", "model.init=pretrained", "dataset=planted_v1"])
    metrics = {**METRICS, "model": "flan-t5-small", "init": "pretrained", "dataset": "planted_v1",
               "squad_version": "v1", "approach": {"label": "full"}, "strategy": "full"}
    for key in ("HasAns_f1", "NoAns_f1", "best_f1"):
        metrics.pop(key)
    write_model_card(tmp_path, metrics, config, None)
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.base_model == "google/flan-t5-small" and data.library_name == "transformers"
    assert data.datasets is None and "random-init" not in data.tags
    assert {r.dataset_type for r in data.eval_results} == {"planted_v1"}
    assert [r.metric_name for r in data.eval_results] == ["Exact match", "F1"]


def test_the_card_says_how_to_pose_questions_to_the_model(tmp_path):
    # the format it was trained in (model.prompt), and model.no_answer where it is not the format's own
    for no_answer, expected in [("format", "`t5` format (`model.prompt`), which"),
                                ("unanswerable", "`t5` format (`model.prompt`, `model.no_answer=unanswerable`), w")]:
        config = compose_config(["experiment=smoke", "dataset=squad_v2", f"model.no_answer={no_answer}"])
        write_model_card(tmp_path / no_answer, METRICS, config, None)
        assert expected in (tmp_path / no_answer / "README.md").read_text()
