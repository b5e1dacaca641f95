"""Invalid options and inputs stop with errors that name them; property tests: loader and scorer never crash."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra.utils import instantiate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from conftest import DEV_V1, DEV_V2, compose_config, subprocess_env
from flan_squad.data.datamodule import SquadDataModule
from flan_squad.data.squad import DataError, Question, read_squad_file
from flan_squad.evaluation.metrics import score
from flan_squad.models.base import BaseModel
from flan_squad.models.strategies import QLoRA
from flan_squad.predict import predict
from flan_squad.utils.config import PROJECT_ROOT
from flan_squad.utils.errors import ConfigError


@pytest.mark.parametrize("override, message", [
    ("strategy=lora strategy.rank=0", "strategy.rank=0"),
    ("strategy=lora strategy.rank=-4", "strategy.rank=-4"),
    ("strategy=full strategy.lr=0", "strategy.lr=0"),
    ("strategy=qlora strategy.lr=-1e-3", "strategy.lr=-0.001"),
    ("strategy=lora strategy.dropout=1.5", "strategy.dropout=1.5"),
    ("strategy=qlora strategy.quant_type=int3", "strategy.quant_type='int3'"),
    ("strategy=qlora strategy.compute_dtype=float16", "strategy.quantize_wo=false"),
])
def test_invalid_strategy_options(override, message, tmp_path):
    cfg = compose_config(override.split(), output_dir=tmp_path)
    with pytest.raises(Exception) as error:
        instantiate(cfg.strategy, _convert_="all")
    assert isinstance(error.value.__cause__ or error.value, ConfigError)
    assert message in str(error.value)


@pytest.mark.parametrize("option, value", [("batch_size", 0), ("eval_batch_size", -2), ("max_source_length", 0),
                                           ("limit_train", -1)])
def test_invalid_dataset_options(option, value):
    with pytest.raises(ConfigError, match=f"dataset.{option}={value}"):
        SquadDataModule(None, "squad_v1", "v1", "rajpurkar/squad", **{option: value})


def test_invalid_model_options():
    with pytest.raises(ConfigError, match="model.init='scratch'"):
        BaseModel(name="x", name_or_path="y", init="scratch")
    with pytest.raises(ConfigError, match="no pretrained weights"):
        BaseModel(name="t5-tiny", name_or_path=None, init="pretrained")


def test_qlora_without_bitsandbytes_says_so(monkeypatch, tiny_base, cpu):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if it were not installed
    with pytest.raises(ConfigError, match="strategy=qlora needs bitsandbytes"):
        QLoRA().build(tiny_base, cpu)


def test_v2_data_under_v1_rules_is_refused(tokenizer):
    dm = SquadDataModule(tokenizer, "squad_v1", "v1", "rajpurkar/squad", str(DEV_V1), str(DEV_V2), limit_val=50)
    with pytest.raises(DataError, match=f"{DEV_V2}: has unanswerable questions; use dataset=squad_v2"):
        dm.setup("validate")


def test_answers_missing_from_their_context_are_counted_not_fatal(tmp_path, tokenizer):
    data = {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "ok", "question": "Where?", "answers": [{"text": "France", "answer_start": 12}]},
        {"id": "bad", "question": "Where?", "answers": [{"text": "Germany", "answer_start": 0}]}]}]}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    dm = SquadDataModule(tokenizer, "squad_v1", "v1", "rajpurkar/squad", str(path), str(path))
    dm.setup("fit")
    assert dm.stats["train_answer_not_in_context"] == 1 and dm.stats["train_examples"] == 2


@pytest.mark.slow
def test_command_line_errors_are_one_line_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flan_squad.train", "experiment=smoke", "dataset.train_file=/nonexistent/train.json",
         f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"],
        cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    message = "dataset.train_file=/nonexistent/train.json: cannot read it (no such file)"
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in result.stderr and (result.stdout + result.stderr).count(message) == 1  # said once


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("strategy=lora strategy.rank=0", "strategy.rank=0: must be a whole number > 0"),
    ("strategy.lr=-1", "strategy.lr=-1: must be > 0"),
    ("dataset.batch_size=0", "dataset.batch_size=0: must be a positive whole number"),
    ("model.init=foo", "model.init='foo': expected 'pretrained' or 'random'"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0: must be >= 1"),
    ("eval.stride=0", "eval.stride=0: must be a whole number >= 1"),
])
def test_bad_values_on_the_command_line_are_one_line(override, message, tmp_path, cache_dir, run_entry_point):
    # Errors raised inside hydra.utils.instantiate arrive wrapped: the user sees the option, not Hydra's wrapping.
    result = run_entry_point("flan_squad.train", ["experiment=smoke", *override.split(),
                                                  f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={cache_dir}"])
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    for noise in ("Traceback", "HYDRA_FULL_ERROR", "Error in call to target", "failed (", "sweep"):
        assert noise not in result.stdout + result.stderr, noise
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_evaluate_bad_run_dir_is_one_line(tmp_path, run_entry_point):
    result = run_entry_point("flan_squad.evaluate", [f"run_dir={tmp_path / 'nope'}", "trainer=cpu",
                                                   f"hydra.run.dir={tmp_path / 'eval'}"])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (f"error: run_dir={tmp_path / 'nope'}: no config.yaml there: "
                                                      f"not a run dir written by flan_squad.train")
    assert "Traceback" not in result.stderr and result.stderr.count("no config.yaml") == 1


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["question=Where?"], "question=... and context=... both need text"),
    (["question=Where?", "context=Here.", "input_file=q.json"], "give either question=... context=... or input_file"),
    (["input_file=/nonexistent/q.json"], "input_file=/nonexistent/q.json: cannot read it"),
])
def test_predict_bad_arguments_are_one_line(argv, message, run_entry_point):
    result = run_entry_point("flan_squad.predict", argv)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1


def test_predict_argument_errors_are_config_errors():
    for args in ({"question": "Where?", "context": None, "input_file": None},
                 {"question": None, "context": None, "input_file": None}):
        with pytest.raises(ConfigError):
            predict(OmegaConf.create(args))


def test_only_flan_squad_errors_become_one_line(monkeypatch, capsys):
    from flan_squad.utils import errors

    monkeypatch.setattr(errors, "in_multirun", lambda: False)
    with pytest.raises(SystemExit) as exit_, errors.exit_on_error():
        try:
            raise ConfigError("strategy.rank=0: must be a whole number > 0")
        except ConfigError as e:
            raise RuntimeError("Error in call to target 'LoRA'") from e  # as hydra's instantiate wraps it
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: strategy.rank=0: must be a whole number > 0\n"
    with pytest.raises(KeyError), errors.exit_on_error():  # a bug keeps its traceback
        raise KeyError("x")
    monkeypatch.setattr(errors, "in_multirun", lambda: True)
    with pytest.raises(ConfigError), errors.exit_on_error():  # a sweep job fails the Hydra way: recorded, raised
        raise ConfigError("strategy.rank=0: must be a whole number > 0")


# --- property tests: anything in, only the documented errors out -----------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["data", "paragraphs", "qas", "context", "question", "id", "answers", "text",
                         "answer_start", "title", "version", "x"]), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=json_values)
def test_loader_on_arbitrary_json_raises_only_data_errors(document, tmp_path):
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(document))
    try:
        version, questions = read_squad_file(path)
    except DataError as e:
        assert str(path) in str(e)
    else:  # every question of the document, in order, as it stands there; v2 when its "version" says 2.x
        expected = [(str(qa["id"]), qa["question"], paragraph["context"], tuple(a["text"] for a in qa["answers"]))
                    for article in document["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
        assert [(q.id, q.question, q.context, q.answers) for q in questions] == expected and expected
        assert version == ("v2" if str(document.get("version", "")).lstrip("v").startswith("2") else "v1")
        assert version == "v2" or all(q.answers for q in questions)  # v1.1: every question has an answer


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64))
def test_loader_on_arbitrary_bytes_raises_only_data_errors(raw, tmp_path):
    path = tmp_path / "fuzz.json"
    path.write_bytes(raw)
    with pytest.raises(DataError):
        read_squad_file(path)  # no short byte string is a SQuAD file with questions in it


answers = st.text(alphabet=st.sampled_from(list("abc the an A,.!?  é«»-\t")), max_size=12)


@settings(max_examples=200, deadline=None)
@given(gold=st.lists(st.lists(answers, max_size=3), min_size=1, max_size=6), data=st.data())
def test_scorer_never_crashes_and_stays_in_range(gold, data):
    for version in ("v1", "v2"):
        golds = [g or ["x"] for g in gold] if version == "v1" else gold
        questions = [Question(str(i), "?", "ctx", tuple(g)) for i, g in enumerate(golds)]
        predictions = {q.id: data.draw(answers) for q in questions}
        result = score(version, questions, predictions)
        assert result["total"] == len(questions)
        assert 0 <= result["exact"] <= 100 and 0 <= result["f1"] <= 100 + 1e-9
        if version == "v2":  # (the official v1.1 rules give exact 1, F1 0 for an empty gold and prediction)
            assert result["exact"] <= result["f1"] + 1e-9
