"""Reading, flattening, sampling and tokenizing real SQuAD files; the documented errors for bad input."""

from __future__ import annotations

import json

import pytest

from conftest import DEV_V1, DEV_V2, TRAIN_V2_SAMPLE
from flan_squad.data.datamodule import SquadDataModule, sample
from flan_squad.data.encoding import collate, encode
from flan_squad.data.prompts import INSTRUCTIONS, UNANSWERABLE, answer_to_prediction
from flan_squad.data.squad import DataError, Question, read_squad_file


@pytest.fixture(scope="module")
def dev_v1():
    return read_squad_file(DEV_V1)


@pytest.fixture(scope="module")
def dev_v2():
    return read_squad_file(DEV_V2)


def test_flattening_counts_match_the_official_files(dev_v1, dev_v2):
    version, questions = dev_v1
    assert version == "v1" and len(questions) == 10_570
    assert len({q.id for q in questions}) == 10_570
    version, questions = dev_v2
    assert version == "v2" and len(questions) == 11_873
    assert sum(not q.has_answer for q in questions) == 5_945


def test_flattening_keeps_every_field(dev_v1):
    raw = json.loads(DEV_V1.read_text())
    first_qa = raw["data"][0]["paragraphs"][0]["qas"][0]
    q = dev_v1[1][0]
    assert q.id == first_qa["id"] and q.question == first_qa["question"]
    assert q.context == raw["data"][0]["paragraphs"][0]["context"]
    assert q.answers == tuple(a["text"] for a in first_qa["answers"])
    assert q.title == raw["data"][0]["title"]


def test_sample_is_seeded_random_and_in_file_order():
    _, questions = read_squad_file(TRAIN_V2_SAMPLE)
    a, b, c = sample(questions, 200, seed=1), sample(questions, 200, seed=1), sample(questions, 200, seed=2)
    assert [q.id for q in a] == [q.id for q in b] and [q.id for q in a] != [q.id for q in c]
    assert [q.id for q in a] != [q.id for q in questions[:200]]  # not the first N
    positions = [questions.index(q) for q in a]
    assert positions == sorted(positions)
    # The unanswerable questions sit in 2 of 10 articles: a random sample finds some, the first 200 none.
    assert sum(not q.has_answer for q in a) > 0 and all(q.has_answer for q in questions[:200])
    assert sample(questions, None, seed=1) == questions


def test_encode_truncates_only_the_context(tokenizer, dev_v1):
    questions = dev_v1[1][:300]
    encoded = encode(questions, tokenizer, "v1", max_source_length=96, max_target_length=32)
    instruction = tokenizer(INSTRUCTIONS["v1"], add_special_tokens=False).input_ids
    assert encoded.stats.examples == 300 and 0 < encoded.stats.truncated <= 300
    assert 0 < encoded.stats.answer_lost < encoded.stats.truncated
    for q, ids in zip(questions, encoded.input_ids):
        question_ids = tokenizer(q.question, add_special_tokens=False).input_ids
        assert len(ids) <= 96
        assert ids[: len(instruction)] == instruction
        assert ids[-len(question_ids) - 1 :] == question_ids + [tokenizer.eos_token_id]


def test_answer_lost_counts_exactly_the_cut_answers(tokenizer):
    context = " ".join(f"word{i}" for i in range(200))
    early = Question("early", "Which word?", context, ("word1",), (context.index("word1"),))
    late = Question("late", "Which word?", context, ("word199",), (context.index("word199"),))
    encoded = encode([early, late], tokenizer, "v1", max_source_length=64, max_target_length=8)
    assert encoded.stats.truncated == 2 and encoded.stats.answer_lost == 1


def test_v2_targets_say_unanswerable(tokenizer):
    questions = [Question("a", "Q?", "Some context.", ()), Question("b", "Q?", "Some context.", ("Some",), (0,))]
    encoded = encode(questions, tokenizer, "v2", 64, 8)
    assert tokenizer.decode(encoded.labels[0], skip_special_tokens=True) == UNANSWERABLE
    assert tokenizer.decode(encoded.labels[1], skip_special_tokens=True) == "Some"
    assert encoded.labels[0][-1] == tokenizer.eos_token_id
    assert INSTRUCTIONS["v2"].endswith(f'say "{UNANSWERABLE}".')


def test_t5_prompt_asks_question_first_cuts_only_the_context_and_answers_nothing_when_unanswerable(tokenizer, dev_v2):
    questions = dev_v2[1][:300]  # answerable and unanswerable, some contexts too long for 96 tokens
    encoded = encode(questions, tokenizer, "v2", max_source_length=96, max_target_length=32, prompt="t5")
    assert 0 < encoded.stats.truncated <= 300
    for q, ids, labels in zip(questions, encoded.input_ids, encoded.labels):
        head = tokenizer(f"question: {q.question.lstrip()} context:", add_special_tokens=False).input_ids
        assert len(ids) <= 96 and ids[: len(head)] == head and ids[-1] == tokenizer.eos_token_id
        context = tokenizer.decode(ids[len(head) : -1])
        assert q.context.replace(" ", "").startswith(context.replace(" ", "")[:50])
        # no answer: end of sequence at once, as run_seq2seq_qa.py's "" target
        assert labels == ([tokenizer.eos_token_id] if not q.answers else tokenizer(q.answers[0]).input_ids)
    assert any(not q.answers for q in questions) and any(q.answers for q in questions)
    # and the same questions in FLAN's format differ (the instruction first, "unanswerable" as the target)
    flan = encode(questions, tokenizer, "v2", max_source_length=96, max_target_length=32)
    assert all(a != b for a, b in zip(flan.input_ids, encoded.input_ids))


def test_an_unknown_prompt_is_refused_naming_the_option(tokenizer):
    from flan_squad.models.base import BaseModel
    from flan_squad.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="model.prompt='chat': expected one of flan, t5"):
        BaseModel(name="x", name_or_path="y", prompt="chat")
    with pytest.raises(ConfigError, match="model.prompt='chat'"):
        SquadDataModule(tokenizer, "squad_v2", "v2", "hub", prompt="chat")


@pytest.mark.parametrize("generated, expected", [
    ("unanswerable", ""), (" Unanswerable ", ""), ("UNANSWERABLE", ""), ("Paris", "Paris"), (" Paris ", "Paris"),
    ("unanswerable question", "unanswerable question"),
])
def test_unanswerable_becomes_empty_prediction(generated, expected):
    assert answer_to_prediction(generated) == expected


def test_collate_pads_per_batch_and_masks_labels():
    batch = collate([{"id": "a", "input_ids": [5, 6, 7], "labels": [9, 1]},
                     {"id": "b", "input_ids": [5], "labels": [1]}], pad_token_id=0)
    assert batch["ids"] == ["a", "b"]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[9, 1], [1, -100]]


def test_datamodule_limits_and_batches(tokenizer):
    dm = SquadDataModule(tokenizer, "squad_v2", "v2", "rajpurkar/squad_v2", str(TRAIN_V2_SAMPLE), str(DEV_V2),
                         max_source_length=128, batch_size=4, eval_batch_size=8, limit_train=20, limit_val=12)
    dm.setup("fit")
    assert len(dm.train_questions) == 20 and len(dm.val_questions) == 12
    assert dm.stats["train_examples"] == 20 and dm.stats["val_examples"] == 12
    train_batches = list(dm.train_dataloader())
    assert sum(len(b["ids"]) for b in train_batches) == 20
    val_ids = [i for b in dm.val_dataloader() for i in b["ids"]]
    assert sorted(val_ids) == sorted(q.id for q in dm.val_questions)  # every question exactly once
    widths = [b["input_ids"].shape[1] for b in dm.val_dataloader()]
    assert widths == sorted(widths, reverse=True)  # longest first


# --- malformed input: errors that name the file and the record ---------------------------------------


def _write(tmp_path, content, name="bad.json"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _squad(qas, version="1.1"):
    paragraph = {"context": "Paris is big.", "qas": qas}
    return json.dumps({"version": version, "data": [{"title": "T", "paragraphs": [paragraph]}]})


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON (line 1"),
    (b"\xff\xfe{}", "not UTF-8"),
    (json.dumps({"version": "1.1"}), "top level: missing key 'data'"),
    (_squad([{"id": "q1", "answers": [{"text": "Paris", "answer_start": 0}]}]),
     "data[0].paragraphs[0].qas[0]: missing key 'question'"),
    (_squad([{"id": "q1", "question": "Q?", "answers": "Paris"}]), "qas[0].answers: expected list, found str"),
    (_squad([{"id": "q1", "question": "Q?", "answers": [{"text": "Paris"}]},
             {"id": "q1", "question": "Q2?", "answers": [{"text": "Paris"}]}]), "duplicate question id 'q1'"),
    (_squad([{"id": "q1", "question": "Q?", "answers": []}]), "v1.1 question needs at least one answer"),
    (_squad([]), "holds no questions"),
])
def test_malformed_files_name_file_and_record(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(DataError) as error:
        read_squad_file(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_missing_file_names_the_option(tmp_path):
    with pytest.raises(DataError, match="no such file.*dataset.train_file"):
        read_squad_file(tmp_path / "nope.json")


def test_a_file_rewritten_in_place_is_read_again(tmp_path):
    # Parsing is cached per process: an edit of the same size within the clock's granularity is still seen.
    path = _write(tmp_path, _squad([{"id": "q1", "question": "Who?", "answers": [{"text": "Paris"}]}]))
    first = read_squad_file(path)[1]
    path.write_text(_squad([{"id": "q1", "question": "How?", "answers": [{"text": "Paris"}]}]))
    second = read_squad_file(path)[1]
    assert [q.question for q in first] == ["Who?"] and [q.question for q in second] == ["How?"]
    second.clear()  # a caller's list is its own
    assert [q.question for q in read_squad_file(path)[1]] == ["How?"]


def test_question_too_long_for_max_source_length(tokenizer):
    long_question = Question("long-q", " ".join(["why"] * 80) + "?", "Context.", ("Context",), (0,))
    with pytest.raises(DataError, match=r"train.json: question .long-q. .* dataset.max_source_length=64"):
        encode([long_question], tokenizer, "v1", 64, 8, source="train.json")


def test_empty_after_limits(tokenizer):
    dm = SquadDataModule(tokenizer, "squad_v1", "v1", "rajpurkar/squad", str(DEV_V1), str(DEV_V1), limit_val=0)
    with pytest.raises(DataError, match=f"{DEV_V1}.*nothing to train or validate on"):
        dm.setup("validate")


def test_hub_offline_fails_fast_with_advice():
    from flan_squad.data.records import read_hub

    with pytest.raises(DataError, match="dataset.train_file=.*dataset.validation_file="):
        read_hub("rajpurkar/squad", None, "validation", None)


@pytest.mark.parametrize("prompt, no_answer, target", [
    ("flan", "format", UNANSWERABLE), ("t5", "format", ""), ("t5", "unanswerable", UNANSWERABLE),
    ("flan", "empty", ""), ("flan", "unanswerable", UNANSWERABLE), ("t5", "empty", "")])
def test_the_no_answer_target_is_the_formats_own_unless_model_no_answer_names_one(tokenizer, prompt, no_answer,
                                                                                   target):
    questions = [Question("a", "Q?", "Some context.", ()), Question("b", "Q?", "Some context.", ("Some",), (0,))]
    encoded = encode(questions, tokenizer, "v2", 64, 8, prompt=prompt, no_answer=no_answer)
    assert encoded.labels[0] == tokenizer(target).input_ids  # "" is </s> alone
    assert tokenizer.decode(encoded.labels[1], skip_special_tokens=True) == "Some"
    # the input is the prompt format's whatever the target
    assert encoded.input_ids == encode(questions, tokenizer, "v2", 64, 8, prompt=prompt).input_ids


def test_an_unknown_no_answer_is_refused_naming_the_option():
    from flan_squad.models.base import BaseModel
    from flan_squad.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="model.no_answer='none': expected one of format, empty, unanswerable"):
        BaseModel(name="x", name_or_path="y", no_answer="none")
    with pytest.raises(ConfigError, match="model.no_answer='none'"):  # the datamodule checks what it is given too
        SquadDataModule(None, "squad_v2", "v2", "hub", no_answer="none")
