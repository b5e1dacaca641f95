"""The learning check: every strategy, trained from random weights through `python -m flan_squad.train` (run in
this process: conftest.run_entry_point) with validation every epoch, ends far above its untrained score on a task
a tiny T5 can learn in a minute.

Random-init scores on real SQuAD are 0 whatever the code does; facts planted in real SQuAD contexts
(`dataset=planted_v1|v2`, flan_squad/data/planted.py) are learnable from scratch. Thresholds are set at about half
of what was measured (AMD EPYC with AVX512-BF16, 2 cores, random init, `experiment=learning_check`, val F1
after epochs 1-3; auto precision = bf16-mixed there, fp32 on CPUs without native bf16):
  full v1   bf16-mixed 48 / 98 / 99    fp32 48 / 100 / 98
  full v2   bf16-mixed 38 / 69 / 86    fp32 38 / 63 / 87   (epoch 2: HasAns 71 / 66, NoAns 62 / 54)
  LoRA all-linear 10 / 38 / 60, QLoRA all-linear 10 / 38 / 59 (bf16-mixed)
  IA3 (lr 0.1, 2 epochs) on planted_v2 from the full planted_v1 model: 94 / 100, NoAns 100 (bf16-mixed); on a
  CPU without native bf16 (simulated, fp32 throughout) 87 / 93, NoAns 75. That base alone: HasAns 99, NoAns 0.
  Full v1 with the other optimizers (fp32, AVX2-only CPU, after epochs 1-2): AdamW8bit 58 / 99, PagedAdamW8bit
  (unpaged on a CPU) 58 / 99, Adafactor 87 / 99.
The untrained model scores 0 on both versions (it never answers "" on v2, nor a planted word on either).
"""

from __future__ import annotations

import csv
import json

import pytest

from conftest import SHARED, compose_config
from flan_squad.evaluate import evaluate


def _multirun(run_entry_point, args: list[str], sweep_dir, cache_dir) -> list[dict]:
    result = run_entry_point("flan_squad.train", ["-m", "experiment=learning_check", "logger=csv", "callbacks=none",
                                                  *args, f"hydra.sweep.dir={sweep_dir}",
                                                  f"paths.cache_dir={cache_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = []
    for job in sorted(p for p in sweep_dir.iterdir() if (p / "metrics.json").exists()):
        with open(job / "csv" / "metrics.csv", newline="") as f:
            validations = [row for row in csv.DictReader(f) if row.get("val/f1")]
        jobs.append({**json.loads((job / "metrics.json").read_text()), "validations": validations})
    return jobs


def _score_before_training(dataset: str, output_dir, cache_dir, model: tuple[str, ...] = ()) -> dict:
    cfg = compose_config(["experiment=learning_check", f"dataset={dataset}", *model], config_name="evaluate",
                         output_dir=output_dir, cache=cache_dir)
    return evaluate(cfg)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, cache_dir) -> dict[str, dict]:
    """The scores of the random-init base itself, on the same validation questions."""
    return {dataset: _score_before_training(dataset, tmp_path_factory.mktemp(dataset), cache_dir)
            for dataset in ("planted_v1", "planted_v2")}


@pytest.mark.long
def test_full_fine_tuning_learns_both_task_versions_and_ia3_learns_on_top(tmp_path, cache_dir, untrained,
                                                                          run_entry_point):
    jobs = _multirun(run_entry_point, ["strategy=full", "dataset=planted_v1,planted_v2", "trainer.max_epochs=2"],
                     tmp_path / "full", cache_dir)
    v1, v2 = sorted(jobs, key=lambda j: j["dataset"])
    assert (v1["dataset"], v2["dataset"]) == ("planted_v1", "planted_v2") and v1["init"] == "random"
    for job in (v1, v2):
        assert len(job["validations"]) == 2  # one per epoch (the best weights' final re-validation is not logged)
    assert untrained["planted_v1"]["f1"] < 2 and v1["f1"] >= 60
    assert untrained["planted_v2"]["HasAns_f1"] < 2 and v2["HasAns_f1"] >= 30
    assert untrained["planted_v2"]["NoAns_f1"] < 2 and v2["NoAns_f1"] >= 25

    # IA3 only rescales a base's activations: from random weights it learns nothing (F1 0 after 3 epochs, lr 3e-3
    # or 3e-2). From the planted_v1 model just trained, which answers every question, it learns to abstain.
    base = (f"model.name_or_path={v1['output_dir']}/model", "model.init=pretrained", "model.tokenizer=null",
            "++model.note='trained in this test on planted_v1, not FLAN-T5'")
    before = _score_before_training("planted_v2", tmp_path / "base_on_v2", cache_dir, base)
    (ia3,) = _multirun(run_entry_point, ["strategy=ia3", "strategy.lr=0.1", "dataset=planted_v2",
                                         "trainer.max_epochs=2", *base], tmp_path / "ia3", cache_dir)
    assert ia3["strategy"] == "ia3" and ia3["init"] == "pretrained" and len(ia3["validations"]) >= 2
    assert before["NoAns_f1"] < 2 and ia3["NoAns_f1"] >= 40
    assert before["HasAns_f1"] >= 50 and ia3["HasAns_f1"] >= 50  # and it keeps answering what it can


@pytest.mark.long
def test_lora_and_qlora_learn(tmp_path, cache_dir, untrained, run_entry_point):
    jobs = _multirun(run_entry_point, ["strategy=lora,qlora", "++strategy.target_modules=all-linear",
                                       "++strategy.dropout=0"], tmp_path, cache_dir)
    by_strategy = {job["strategy"]: job for job in jobs}
    assert set(by_strategy) == {"lora", "qlora"} and by_strategy["qlora"]["params_4bit"] > 0
    for name, threshold in (("lora", 30), ("qlora", 30)):
        job = by_strategy[name]
        f1_per_epoch = [float(v["val/f1"]) for v in job["validations"]]
        assert len(f1_per_epoch) >= 3, f1_per_epoch
        # QLoRA keeps learning after each validation pass (bitsandbytes' CPU inference repacking never runs)
        assert job["f1"] >= untrained["planted_v1"]["f1"] + threshold and max(f1_per_epoch[1:]) > f1_per_epoch[0], (
            name, f1_per_epoch)


@pytest.mark.long
def test_every_optimizer_learns_and_records_what_its_state_holds(tmp_path, cache_dir, untrained, run_entry_point):
    # conf/optimizer beside the default AdamW (the rest of this file, which validates between epochs): full
    # fine-tuning on planted_v1, one epoch at the learning check's lr (3e-3) for each.
    jobs = _multirun(run_entry_point, ["strategy=full", "dataset=planted_v1", "trainer.max_epochs=1",
                                       "optimizer=adamw8bit,paged_adamw8bit,adafactor"], tmp_path, cache_dir)
    by_optimizer = {job["optimizer"]: job for job in jobs}
    # bitsandbytes runs its paged AdamW unpaged on a CPU (it warns), with the same state as AdamW8bit
    assert set(by_optimizer) == {"AdamW8bit", "PagedAdamW8bit", "Adafactor"}
    for name, job in by_optimizer.items():
        f1_per_epoch = [float(v["val/f1"]) for v in job["validations"]]
        assert len(f1_per_epoch) == 1 and job["lr"] == 3e-3, (name, f1_per_epoch)
        assert untrained["planted_v1"]["f1"] < 2 and job["f1"] >= 25, (name, f1_per_epoch)
    # What the state holds: AdamW keeps two fp32 moments per parameter (8 bytes); the 8-bit ones two bytes (and fp32
    # moments for tensors under 4,096 elements); Adafactor a row and a column of second moments per matrix.
    adamw_mb = 8 * by_optimizer["Adafactor"]["trainable_params"] / 2**20
    assert by_optimizer["AdamW8bit"]["optimizer_state_mb"] == by_optimizer["PagedAdamW8bit"]["optimizer_state_mb"]
    assert 0.2 * adamw_mb < by_optimizer["AdamW8bit"]["optimizer_state_mb"] < 0.3 * adamw_mb
    assert 0 < by_optimizer["Adafactor"]["optimizer_state_mb"] < 0.05 * adamw_mb


# The decoy check (docs/learning.md, "Learning parity"): t5-mini from random init, 2,000 questions,
# 3 epochs (375 steps), fp32.
# Final-epoch F1 / NoAns F1 measured at seeds 0, 1, 2 (AMD EPYC with AVX512-BF16, 1 thread), random init:
#   OMP_NUM_THREADS=1 python -m flan_squad.train experiment=learning_check <DECOY_MINI> seed=S model.init_seed=S
#     model.prompt=t5|flan dataset.train_file=<dir>/train.json dataset.validation_file=<dir>/dev.json
#   (<dir>: flan_squad.data.planted.build_short_decoy(<dir>, '../shared'))
#   model.prompt=t5   (t5_tiny's default)         89.0 / 79.0   75.0 / 41.9   75.5 / 40.3
#   model.prompt=flan (FLAN's format)             67.0 /  6.5   73.5 / 50.0   74.5 / 29.0
# In this test (2 threads, in-process) seed 0 gave 86.0 / 62.9 with t5 and 67.0 / 6.5 with flan: the thread count
# moves the trajectory. The thresholds pass every seed measured with the t5 format and fail seed 0 (this test's)
# with FLAN's.
DECOY_MINI = ["model.prompt=t5",
              "model.architecture={d_model: 128, d_kv: 32, num_layers: 3, num_decoder_layers: 3, num_heads: 4, "
              "d_ff: 384, dropout_rate: 0.0}", "strategy=full", "strategy.lr=1e-3", "trainer.max_epochs=3",
              "trainer.precision=32-true", "seed=0", "dataset=squad_v2", "dataset.limit_train=null",
              "dataset.limit_val=null", "dataset.max_source_length=128"]


@pytest.mark.long
def test_unanswerable_questions_with_a_decoy_fact_are_learned(tmp_path, cache_dir, run_entry_point):
    # Each context holds one code; in a third of the questions it is of another kind than the one asked for, so
    # the model must read the kind. With FLAN's format (instruction, context, question; "unanswerable") a model
    # trained from random weights mostly copied the decoy (docs/learning.md, against Seq2SeqTrainer).
    from flan_squad.data.planted import build_short_decoy

    task = build_short_decoy(tmp_path / "task", SHARED)
    (job,) = _multirun(run_entry_point, [*DECOY_MINI, f"dataset.train_file={task}/train.json",
                                         f"dataset.validation_file={task}/dev.json"], tmp_path / "runs", cache_dir)
    assert job["init"] == "random" and job["squad_version"] == "v2" and len(job["validations"]) == 3
    assert job["NoAns_f1"] >= 35 and job["f1"] >= 70, {k: job[k] for k in ("f1", "HasAns_f1", "NoAns_f1")}


def test_planted_task_is_seeded_and_answerable_by_reading(tmp_path):
    from flan_squad.data.planted import build, make_split
    from flan_squad.data.squad import read_squad_file

    texts = ["First real sentence. Second one.", "Another paragraph here."]
    assert make_split(texts, 50, "v2", seed=3, prefix="x") == make_split(texts, 50, "v2", seed=3, prefix="x")
    assert make_split(texts, 50, "v2", seed=3, prefix="x") != make_split(texts, 50, "v2", seed=4, prefix="x")
    out = build(tmp_path, SHARED)
    for version in ("v1", "v2"):
        _, train = read_squad_file(out / version / "train.json")
        _, dev = read_squad_file(out / version / "dev.json")
        assert not {q.context for q in train} & {q.context for q in dev}  # nothing to memorise across splits
        for q in train + dev:
            kind = q.question.split()[3]  # "What is the <kind> code?"
            if q.answers:  # the answer is the word of the asked-for fact, at its offset
                start = q.answer_starts[0]
                assert q.context[start : start + len(q.answers[0])] == q.answers[0]
                assert f"The {kind} code is {q.answers[0]}." in q.context
            else:
                assert f"The {kind} code is" not in q.context and version == "v2"
        unanswerable = sum(not q.answers for q in train) / len(train)
        assert (unanswerable == 0) if version == "v1" else (0.2 < unanswerable < 0.3)


def test_decoy_task_asks_for_one_kind_and_plants_another_in_unanswerable_questions(tmp_path):
    """The learning-parity task (benchmarks/parity.py): every context holds one code; a third of the questions ask
    for another kind, so finding "a code" is not enough."""
    from flan_squad.data.planted import KINDS, build_decoy, make_decoy_split
    from flan_squad.data.squad import read_squad_file

    texts = ["First real sentence. Second one.", "Another paragraph here."]
    assert make_decoy_split(texts, 30, seed=3, prefix="x") == make_decoy_split(texts, 30, seed=3, prefix="x")
    assert make_decoy_split(texts, 30, seed=3, prefix="x") != make_decoy_split(texts, 30, seed=4, prefix="x")
    out = build_decoy(tmp_path, SHARED, train=300, dev=60)
    for split, n in (("train", 300), ("dev", 60)):
        version, questions = read_squad_file(out / f"{split}.json")
        assert version == "v2" and len(questions) == n
        for q in questions:
            kind = q.question.split()[3]  # "What is the <kind> code?"
            planted = [k for k in KINDS if f"The {k} code is " in q.context]
            assert len(q.context) <= 400 + len("The access code is thunder. ") and len(planted) == 1
            if q.answers:
                start = q.answer_starts[0]
                assert planted == [kind] and q.context[start : start + len(q.answers[0])] == q.answers[0]
            else:
                assert planted != [kind]  # a decoy: a code of another kind
        unanswerable = sum(not q.answers for q in questions) / n
        assert 0.2 < unanswerable < 0.45


def test_the_comparisons_decoy_task_chooses_learning_rates_apart_from_what_it_reports(tmp_path, tokenizer):
    """dataset=decoy_v2 (make compare-cpu): train, tune (where learning rates are chosen) and dev (where results are
    reported) on disjoint paragraphs. With a tune split, dev comes from the other half of the paragraphs held out from
    training (the learning check's files, without one, keep all of them); train is the same either way."""
    from flan_squad.data.datamodule import PlantedDataModule
    from flan_squad.data.planted import DECOY_SIZES, build_short_decoy, paragraphs
    from flan_squad.utils.errors import ConfigError

    contexts = {}
    for split in ("validation", "tune"):
        dm = PlantedDataModule(cache_dir=str(tmp_path), shared_dir=str(SHARED), version="v2", task="decoy",
                               val_split=split, name="decoy_v2", hub_id="", tokenizer=tokenizer, max_source_length=128,
                               max_target_length=8)
        dm.setup("fit")
        assert len(dm.train_questions) == DECOY_SIZES["train"] and len(dm.val_questions) == 300
        contexts["train"] = {q.context for q in dm.train_questions}
        contexts[split] = {q.context for q in dm.val_questions}
    opening = {p: i for i, p in enumerate(paragraphs(SHARED))}
    pools = {split: {next(p for p in opening if p in c) for c in cs} for split, cs in contexts.items()}
    assert not pools["train"] & pools["tune"] and not pools["train"] & pools["validation"]
    assert not pools["tune"] & pools["validation"]
    assert (build_short_decoy(tmp_path / "a", SHARED) / "dev.json").read_bytes() != (
        build_short_decoy(tmp_path / "b", SHARED, tune=100) / "dev.json").read_bytes()
    assert (build_short_decoy(tmp_path / "a", SHARED) / "train.json").read_bytes() == (
        build_short_decoy(tmp_path / "b", SHARED, tune=100) / "train.json").read_bytes()
    for bad in ({"task": "decoy", "version": "v1"}, {"task": "other", "version": "v2"},
                {"task": "planted", "version": "v2", "val_split": "tune"}):
        with pytest.raises(ConfigError, match="dataset.task|dataset.val_split"):
            PlantedDataModule(cache_dir=str(tmp_path), shared_dir=str(SHARED), name="x", hub_id="", tokenizer=tokenizer,
                              **{"val_split": "validation", **bad})
