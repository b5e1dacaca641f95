"""Context windows, window selection, no-answer probabilities and snapping (flan_squad.evaluation.inference)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEV_V1, DEV_V2
from flan_squad.data.encoding import encode
from flan_squad.data.prompts import INSTRUCTIONS, UNANSWERABLE
from flan_squad.data.squad import read_squad_file
from flan_squad.evaluation.inference import (
    WindowAnswer,
    answer_windows,
    collect_answers,
    combine_windows,
    generate_windows,
    run_encoder,
    sequence_logprobs,
    snap_to_context,
    spellable_by,
    window_answers,
)
from flan_squad.evaluation.metrics import score
from flan_squad.evaluation.squad_metric import SquadAnswers


@pytest.fixture(scope="module")
def dev_questions():
    return read_squad_file(DEV_V1)[1][:60]


def test_windows_cover_the_whole_context_with_overlap(dev_questions, tokenizer):
    long_q = max(dev_questions, key=lambda q: len(q.context))
    enc = encode([long_q], tokenizer, "v1", 96, 16, stride=16)
    instruction = len(tokenizer(INSTRUCTIONS["v1"], add_special_tokens=False).input_ids)
    question = len(tokenizer(long_q.question, add_special_tokens=False).input_ids)
    context_ids = tokenizer(long_q.context, add_special_tokens=False).input_ids
    pieces = [ids[instruction : len(ids) - question - 1] for ids in enc.input_ids]
    assert enc.stats.windowed == 1 and enc.stats.truncated == 0 and len(pieces) == enc.stats.windows > 2
    assert enc.ids == [long_q.id] * len(pieces) and enc.windows == list(range(len(pieces)))
    assert all(len(ids) <= 96 for ids in enc.input_ids)
    # consecutive windows overlap by at least the stride, and together they are the whole context
    covered, position = [], 0
    for piece in pieces:
        start = next(s for s in range(position, len(context_ids)) if context_ids[s : s + len(piece)] == piece)
        assert not covered or covered[-1] - start >= 16
        covered.append(start + len(piece))
        position = start + 1
    assert covered[-1] == len(context_ids) and pieces[0] == context_ids[: len(pieces[0])]


def test_short_contexts_get_one_window_and_training_still_truncates(dev_questions, tokenizer):
    short = encode(dev_questions[:5], tokenizer, "v1", 512, 16, stride=128)
    assert short.stats.windowed == 0 and short.windows == [0] * 5 and short.ids == [q.id for q in dev_questions[:5]]
    truncated = encode(dev_questions[:5], tokenizer, "v1", 64, 16)
    assert truncated.stats.truncated == 5 and truncated.stats.windows == 5


def w(text, score, logprob=-1.0, na=None):
    return WindowAnswer(text, score, logprob, na)


def test_best_window_wins_and_unanswerable_needs_every_window():
    best, na = combine_windows([w("", -0.1, na=-0.5), w("Paris", -0.7, -2.0, -3.0), w("Rome", -0.4, -1.5, -1.0)])
    assert best.text == "Rome"  # the best-scoring real answer, even though window 0 said "unanswerable"
    assert na == pytest.approx(1 / (1 + math.exp(-(-1.0 - -1.5))))  # P(u) / (P(u) + P(a)) in Rome's window
    best, na = combine_windows([w("", -0.1, na=-0.1), w("", -0.2, na=-0.2)])
    assert best is None and na == 1.0
    best, na = combine_windows([w("Paris", -0.5)])  # v1: no na_logprob, no probability
    assert best.text == "Paris" and na is None
    assert combine_windows([w("a", -1.0, -900.0, -0.1)])[1] == 1.0  # no overflow at the extremes
    assert combine_windows([w("a", -1.0, -0.1, -900.0)])[1] == 0.0


@settings(max_examples=200, deadline=None)
@given(context=st.text(min_size=1, max_size=60), data=st.data())
def test_snapping_never_changes_an_answer_found_in_the_context(context, data):
    start = data.draw(st.integers(0, len(context) - 1))
    end = data.draw(st.integers(start + 1, len(context)))
    assert snap_to_context(context[start:end], context) == context[start:end]


def test_snapping_maps_unspellable_text_back_to_the_context(tokenizer):
    spellable = spellable_by(tokenizer)
    context = "The word naïve ~x comes from French; the {set} is closed; it cost 1000 dollars in São Paulo."
    for generated, expected in [
        (tokenizer.decode(tokenizer("naïve ~x").input_ids, skip_special_tokens=True), "naïve ~x"),
        (tokenizer.decode(tokenizer("São Paulo").input_ids, skip_special_tokens=True), "São Paulo"),
        ("1,000", "1000"), ("NAÏVE", "naïve"), ("set", "set"),
    ]:
        assert generated not in context or generated == expected
        assert snap_to_context(generated, context, spellable) == expected, generated
    assert snap_to_context("Berlin", context, spellable) == "Berlin"  # nothing matches: unchanged
    assert snap_to_context("ost", "it cost 1000", spellable) == "ost"  # inside a word: in context, unchanged
    assert snap_to_context("OST", "it cost 1000", spellable) == "OST"  # only whole words are snapped to
    assert snap_to_context("", context, spellable) == ""


def _window_batch(tokenizer, questions) -> tuple[torch.Tensor, torch.Tensor]:
    """The questions' context windows (v2 prompts, 128 tokens, stride 32), padded into one batch: ids and mask."""
    enc = encode(questions, tokenizer, "v2", 128, 16, stride=32)
    width = max(len(x) for x in enc.input_ids)
    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in enc.input_ids])
    return input_ids, (torch.arange(width)[None] < torch.tensor([len(x) for x in enc.input_ids])[:, None]).long()


def test_window_scores_are_the_model_log_probabilities(tiny_base, cpu, tokenizer, dev_questions):
    model = tiny_base.load().eval()
    input_ids, mask = _window_batch(tokenizer, dev_questions[:4])
    answers = answer_windows(model, tokenizer, input_ids, mask, 6, no_answer=UNANSWERABLE)
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        labels = generated[:, 1:].clone()
        for row in labels:  # only up to the first </s> is the answer
            eos = (row == tokenizer.eos_token_id).nonzero()
            if len(eos):
                row[eos[0, 0] + 1 :] = -100
        expected = sequence_logprobs(model, run_encoder(model, input_ids, mask), mask, labels)
    assert [a.logprob for a in answers] == pytest.approx(expected.tolist(), abs=1e-4)
    lengths = (labels != -100).sum(1)
    assert [a.score for a in answers] == pytest.approx((expected / lengths).tolist(), abs=1e-4)
    # log P("unanswerable"), by a plain teacher-forced forward pass: the sum of its tokens' log-probabilities
    target = torch.tensor([tokenizer("unanswerable").input_ids] * len(input_ids))
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, labels=target).logits
    na_expected = logits.log_softmax(-1).gather(-1, target[..., None]).squeeze(-1).sum(1)
    assert [a.na_logprob for a in answers] == pytest.approx(na_expected.tolist(), abs=1e-4)
    # the t5 prompt's no-answer answer is the empty one: log P(</s> first)
    empty = answer_windows(model, tokenizer, input_ids, mask, 6, no_answer="")
    with torch.no_grad():
        first = model(input_ids=input_ids, attention_mask=mask, labels=target[:, :1]).logits[:, 0].log_softmax(-1)
    assert [a.na_logprob for a in empty] == pytest.approx(first[:, tokenizer.eos_token_id].tolist(), abs=1e-4)


def test_beam_answers_are_scored_as_greedy_ones_and_leave_the_no_answer_likelihood_alone(tiny_base, tokenizer,
                                                                                        dev_questions):
    model = tiny_base.load().eval()
    input_ids, mask = _window_batch(tokenizer, dev_questions[:4])
    greedy = generate_windows(model, tokenizer, input_ids, mask, 6, no_answer=UNANSWERABLE)
    tokens, logprob, na_logprob = generate_windows(model, tokenizer, input_ids, mask, 6, no_answer=UNANSWERABLE,
                                                   num_beams=3)
    # P(no answer | window) is the same whatever the decoding: only P(answer) moves with the answer chosen
    assert torch.equal(na_logprob, greedy[2])
    with torch.no_grad():
        beams = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=6, num_beams=3,
                               do_sample=False, output_scores=True, return_dict_in_generate=True)
        labels = beams.sequences[:, 1:].clone()
        for row in labels:  # only up to the first </s> is the answer
            eos = (row == tokenizer.eos_token_id).nonzero()
            if len(eos):
                row[eos[0, 0] + 1 :] = -100
        expected = sequence_logprobs(model, run_encoder(model, input_ids, mask), mask, labels)
    assert torch.equal(tokens, beams.sequences[:, 1:])  # beam search's own answer
    # log P(answer) as for a greedy answer: the whole sequence by teacher forcing (the window-score test above)
    assert logprob.tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    # and the window score (mean log-probability per token) is the very score beam search ranked its beams by
    answers = window_answers(tokenizer, tokens, logprob, na_logprob)
    assert [a.score for a in answers] == pytest.approx(beams.sequences_scores.tolist(), abs=1e-4)
    assert [a.na_logprob for a in answers] == [a.na_logprob for a in window_answers(tokenizer, *greedy)]


def test_validation_metric_scores_as_the_window_answers_would(tokenizer):
    # Validation accumulates tensors in a torchmetrics Metric; compute() must give what the answers themselves
    # give through collect_answers + the official rules, whatever the batches, and count a question's window once
    # when a distributed sampler repeats it.
    dev_questions = read_squad_file(DEV_V2)[1][:60]
    questions = [q for q in dev_questions if q.answers][:2] + [q for q in dev_questions if not q.answers][:1]
    rows = [(questions[0].id, 0, questions[0].answers[0], -2.0, -5.0), (questions[0].id, 1, "nowhere", -9.0, -1.0),
            (questions[1].id, 0, "unanswerable", -1.0, -0.5), (questions[2].id, 0, questions[1].answers[0], -3.0, -4.0)]
    tokens = [tokenizer(text).input_ids for _, _, text, _, _ in rows]
    width = 8
    padded = torch.tensor([t + [tokenizer.pad_token_id] * (width - len(t)) for t in tokens])
    logprob, na = torch.tensor([r[3] for r in rows]), torch.tensor([r[4] for r in rows])
    metric = SquadAnswers(tokenizer, "v2", max_new_tokens=width)
    metric.set_questions(dev_questions)  # indices into the whole split; questions not answered are not scored
    for batch in ([0, 2], [1, 3], [3]):  # the last batch repeats a window, as DDP's padding does
        index = torch.tensor(batch)
        narrow = padded[index][:, : max(len(tokens[i]) for i in batch)]  # each batch as wide as its answers
        metric.update([rows[i][0] for i in batch], [rows[i][1] for i in batch], narrow, logprob[index], na[index])
    result = metric.compute()

    expected_windows = dict(zip([(r[0], r[1]) for r in rows], window_answers(tokenizer, padded, logprob, na)))
    expected = collect_answers(questions, expected_windows, True, spellable_by(tokenizer))
    assert result.windows == expected_windows and [q.id for q in result.questions] == [q.id for q in questions]
    assert result.answers.predictions == expected.predictions and result.answers.na_probs == expected.na_probs
    assert result.answers.stats == expected.stats == {"multi_window_questions": 1, "snapped_answers": 0}
    assert result.scores == score("v2", questions, expected.predictions, expected.na_probs)
    assert result.answers.predictions[questions[0].id] == questions[0].answers[0]  # its better window
    assert result.answers.predictions[questions[1].id] == ""  # "unanswerable" is no answer


def test_model_no_answer_is_the_target_of_training_validation_and_answering(tmp_path, cache_dir, tokenizer):
    # model.no_answer=unanswerable under the t5 format (whose own no-answer answer is the empty one): training learns
    # "unanswerable", and validation and answer_questions (evaluate, predict, serve) score P("unanswerable").
    from conftest import compose_config
    from flan_squad.evaluate import validate
    from flan_squad.evaluation.inference import answer_questions

    cfg = compose_config(["model=t5_tiny", "model.no_answer=unanswerable", "dataset=squad_v2", "dataset.limit_val=6",
                          "dataset.limit_train=40", "eval.max_new_tokens=2", "trainer.precision=32-true"],
                         config_name="evaluate", output_dir=tmp_path, cache=cache_dir)
    passed = validate(cfg, progress_bar=False)
    base, dm, model = passed.restored.base, passed.datamodule, passed.restored.model
    assert base.question_format == {"prompt": "t5", "no_answer": "unanswerable"}
    dm.setup("fit")
    unanswerable = [labels for q, labels in zip(dm.train_questions, dm.encoded_train.labels) if not q.answers]
    assert unanswerable and all(labels == tokenizer(UNANSWERABLE).input_ids for labels in unanswerable)

    # validation: each window's log P(no answer) is log P("unanswerable") by a teacher-forced forward pass
    enc = dm.encoded_val
    target = torch.tensor([tokenizer(UNANSWERABLE).input_ids])
    with torch.no_grad():
        for i, (qid, window) in enumerate(zip(enc.ids, enc.windows)):
            logits = model(input_ids=torch.tensor([enc.input_ids[i]]), labels=target).logits
            expected = logits.log_softmax(-1).gather(-1, target[..., None]).sum().item()
            assert passed.module.windows[qid, window].na_logprob == pytest.approx(expected, abs=1e-4)
    # answering outside Lightning gives validation's no-answer probabilities, and the format's own target others
    answered = answer_questions(model, tokenizer, dm.val_questions, "v2", dm.max_source_length, dm.eval_stride,
                                max_new_tokens=2, **base.question_format)
    assert answered.na_probs == pytest.approx(passed.module.na_probs, abs=1e-5)
    own = answer_questions(model, tokenizer, dm.val_questions, "v2", dm.max_source_length, dm.eval_stride,
                           max_new_tokens=2, prompt="t5")
    assert all(abs(own.na_probs[q] - answered.na_probs[q]) > 1e-3 for q in own.na_probs)
