"""From model inputs to answers: batched generation (greedy, or beam search with `eval.num_beams`), decoded into
prediction text.

Training validation, evaluation, prediction and the benchmarks all answer questions through here:
1. `answer_windows` answers a batch of encoded inputs (one per context window), and scores each answer with the
   model's own log-probabilities (and, for v2, the log-probability of the no-answer answer).
2. `combine_windows` picks one answer per question from its windows and gives its no-answer probability.
3. `snap_to_context` maps an answer the tokenizer could not spell back to the context's own text.
`collect_answers` does 2 and 3 for a whole split; `answer_questions` runs 1-3 on plain questions.

Definitions (also in the README):
- window score: the mean log-probability per generated token (end-of-sequence included) of the window's
  answer, so that long and short answers compete fairly.
- no-answer probability of a question: P(u) / (P(u) + P(a)), where P(a) is the model's probability of
  the chosen answer (the whole generated sequence, greedy or beam: the same definition, not beam search's
  length-normalised score) and P(u) that of the no-answer answer ("unanswerable" in the
  `flan` prompt format, the empty answer in `t5`'s), both given the window the answer came from; it is 1.0
  when every window gave no answer (the prediction is then "" whatever the threshold).
"""

from __future__ import annotations

import copy
import functools
import math
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flan_squad.data.encoding import collate, encode
from flan_squad.data.prompts import answer_to_prediction, no_answer_target
from flan_squad.data.squad import Question

# --- 1. one answer per window, with the model's scores -------------------------------------------------


@dataclass
class WindowAnswer:
    text: str  # prediction text: "" when the model said "unanswerable" (or nothing)
    score: float  # mean log-probability per generated token: compares windows of one question
    logprob: float  # log P(whole answer sequence)
    na_logprob: float | None = None  # log P(no-answer answer), for SQuAD v2


def run_encoder(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The encoder pass, done once and shared by the loss, the generation and the no-answer likelihood."""
    return model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)


def sequence_logprobs(model: nn.Module, encoder_outputs, attention_mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """log P(labels) per row by teacher forcing (labels padded with -100)."""
    logits = model(encoder_outputs=encoder_outputs, attention_mask=attention_mask, labels=labels).logits
    logp = logits.float().log_softmax(-1)
    mask = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


@torch.no_grad()
def generate_windows(model: nn.Module, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     max_new_tokens: int, no_answer: str | None = None, encoder_outputs=None, num_beams: int = 1,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Answer token ids for each row (padded after their end of sequence), log P(answer) and, given the `no_answer`
    text (v2: "unanswerable" or ""), log P(no_answer): tensors, as validation's metric accumulates them. Greedy
    (`num_beams=1`), or beam search; either way log P(answer) is the model's probability of the whole answer."""
    if encoder_outputs is None:
        encoder_outputs = run_encoder(model, input_ids, attention_mask)
    greedy = num_beams == 1
    # a copy: beam search repeats the encoder outputs for each beam in place, and they are scored with once more below
    out = model.generate(encoder_outputs=copy.copy(encoder_outputs), attention_mask=attention_mask,
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                         output_logits=greedy, return_dict_in_generate=True, synced_gpus=_sharded(model))
    tokens = out.sequences[:, 1:]  # drop the decoder start token
    if greedy:  # the scores come with the greedy steps
        step_logp = torch.stack([step.float().log_softmax(-1).gather(-1, tokens[:, i : i + 1]).squeeze(-1)
                                 for i, step in enumerate(out.logits)], dim=1)
        logprob = (step_logp * _answer_mask(tokens, tokenizer.eos_token_id)).sum(1)
    else:  # beam scores are length-normalised and reordered: score the chosen answer as the no-answer one is
        logprob = sequence_logprobs(model, encoder_outputs, attention_mask,
                                    tokens.masked_fill(~_answer_mask(tokens, tokenizer.eos_token_id), -100))
    na_logprob = None
    if no_answer is not None:
        target = tokenizer(no_answer).input_ids  # ends with </s> ("" is </s> alone)
        labels = torch.tensor([target] * len(tokens), device=tokens.device)
        na_logprob = sequence_logprobs(model, encoder_outputs, attention_mask, labels)
    return tokens, logprob, na_logprob


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP shards the model over several processes: each forward pass then gathers weights from all of them,
    so a process whose rows have all ended must go on stepping until every process is done (`synced_gpus`)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _answer_mask(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    # Rows that finished early are padded after their end-of-sequence token: those steps do not count.
    is_eos = tokens == eos_token_id
    return (is_eos.long().cumsum(1) - is_eos.long()) == 0


def window_answers(tokenizer, tokens: torch.Tensor, logprob: torch.Tensor,
                   na_logprob: torch.Tensor | None = None) -> list[WindowAnswer]:
    """`generate_windows`' tensors as one `WindowAnswer` per row: the decoded text and the window score."""
    score = logprob / _answer_mask(tokens, tokenizer.eos_token_id).sum(1).clamp(min=1)
    texts = [answer_to_prediction(t) for t in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    na = [None] * len(texts) if na_logprob is None else na_logprob.tolist()
    return [WindowAnswer(t, s, lp, n) for t, s, lp, n in zip(texts, score.tolist(), logprob.tolist(), na)]


def answer_windows(model: nn.Module, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   max_new_tokens: int, no_answer: str | None = None, encoder_outputs=None,
                   num_beams: int = 1) -> list[WindowAnswer]:
    """The answer for each row (greedy, or beam search over `num_beams`), scored by its own log-probabilities; the
    `no_answer` text adds log P(no_answer)."""
    generated = generate_windows(model, tokenizer, input_ids, attention_mask, max_new_tokens, no_answer,
                                 encoder_outputs, num_beams)
    return window_answers(tokenizer, *generated)


# --- 2. one answer per question ------------------------------------------------------------------------


def combine_windows(windows: Sequence[WindowAnswer]) -> tuple[WindowAnswer | None, float | None]:
    """The best-scoring real answer over a question's windows (None: every window gave no answer),
    and the question's no-answer probability (None without `na_logprob`s)."""
    answered = [w for w in windows if w.text]
    best = max(answered, key=lambda w: w.score) if answered else None
    if any(w.na_logprob is None for w in windows):
        return best, None
    if best is None:
        return None, 1.0
    # P(u) / (P(u) + P(a)) = sigmoid(log P(u) - log P(a)), computed without overflow
    diff = best.na_logprob - best.logprob
    na_prob = 1.0 / (1.0 + math.exp(-diff)) if diff > -700 else 0.0
    return best, na_prob


# --- 3. answers the tokenizer could not spell ------------------------------------------------------------


def spellable_by(tokenizer) -> Callable[[str], bool]:
    """Whether the tokenizer can write a character (T5's vocabulary lacks e.g. "{", "<", "ï")."""

    @functools.cache
    def spellable(ch: str) -> bool:
        return tokenizer.unk_token_id not in tokenizer(ch, add_special_tokens=False).input_ids

    return spellable


def _snap_key(text: str, spellable: Callable[[str], bool] | None) -> tuple[str, list[int]]:
    """Letters and digits only, lower-cased, accents stripped, skipping what the tokenizer cannot spell;
    with the position in `text` each key character came from."""
    key, index = [], []
    for i, ch in enumerate(text):
        if spellable is not None and not ch.isspace() and not spellable(ch):
            continue
        for c in unicodedata.normalize("NFKD", ch):
            if c.isalnum():
                key.append(c.lower())
                index.append(i)
    return "".join(key), index


def snap_to_context(answer: str, context: str, spellable: Callable[[str], bool] | None = None) -> str:
    """The span of `context` that `answer` stands for, if the answer is not already in it.

    An answer that occurs in the context (or is "") is returned unchanged. Otherwise the first span of
    whole words whose letters and digits match the answer's (ignoring case, accents, punctuation, spacing
    and characters the tokenizer cannot spell) replaces it; with no such span the answer stays as it is.
    """
    if not answer or answer in context:
        return answer
    answer_key, _ = _snap_key(answer, spellable)
    if not answer_key:
        return answer
    context_key, index = _snap_key(context, spellable)
    start = context_key.find(answer_key)
    while start >= 0:
        begin, end = index[start], index[start + len(answer_key) - 1] + 1
        at_word_edges = (begin == 0 or not context[begin - 1].isalnum()) and (
            end == len(context) or not context[end].isalnum())
        if at_word_edges:
            return context[begin:end]
        start = context_key.find(answer_key, start + 1)
    return answer


# --- a whole split -------------------------------------------------------------------------------------


@dataclass
class Answers:
    predictions: dict[str, str]  # {question_id: answer}, "" for no answer, in question order
    na_probs: dict[str, float] | None  # SQuAD v2 only
    stats: dict[str, int] = field(default_factory=dict)


def collect_answers(questions: Sequence[Question], windows: Mapping[tuple[str, int], WindowAnswer],
                    snap: bool = True, spellable: Callable[[str], bool] | None = None) -> Answers:
    """Combine each question's windows ({(question id, window number): answer}) into its answer (+ no-answer
    probability), snapping to the context. Every question must have at least one window."""
    by_question: dict[str, list[WindowAnswer]] = defaultdict(list)
    for (qid, _), answer in sorted(windows.items(), key=lambda item: item[0]):
        by_question[qid].append(answer)
    predictions: dict[str, str] = {}
    na_probs: dict[str, float] = {}
    snapped = multi_window = 0
    for q in questions:
        best, na_prob = combine_windows(by_question[q.id])
        text = best.text if best is not None else ""
        if snap and text:
            snapped_text = snap_to_context(text, q.context, spellable)
            snapped += snapped_text != text
            text = snapped_text
        predictions[q.id] = text
        multi_window += len(by_question[q.id]) > 1
        if na_prob is not None:
            na_probs[q.id] = na_prob
    has_na = bool(questions) and len(na_probs) == len(questions)
    return Answers(predictions, na_probs if has_na else None,
                   {"multi_window_questions": multi_window, "snapped_answers": snapped})


def answer_questions(model: nn.Module, tokenizer, questions: Sequence[Question], version: str,
                     max_source_length: int = 512, stride: int | None = 128, batch_size: int = 16,
                     max_new_tokens: int = 32, snap: bool = True, progress: Iterable | None = None,
                     prompt: str = "flan", num_beams: int = 1, no_answer: str = "format") -> Answers:
    """Answer plain questions outside Lightning (predict, export checks): the same windows, decoding (`num_beams`)
    and choices as validation, in the `prompt` format (and `no_answer`) the model was trained with. Batches are sorted
    by input length (longest first); answers come back in question order."""
    encoded = encode(questions, tokenizer, version, max_source_length, 1, stride=stride, prompt=prompt,
                     no_answer=no_answer)
    order = sorted(range(len(encoded.ids)), key=lambda i: -len(encoded.input_ids[i]))
    unanswerable = no_answer_target(prompt, no_answer) if version == "v2" else None
    device = next(model.parameters()).device
    windows: dict[tuple[str, int], WindowAnswer] = {}
    model.eval()
    batches = range(0, len(order), batch_size)
    for start in (progress(batches) if progress else batches):
        rows = order[start : start + batch_size]
        batch = collate([{"id": encoded.ids[i], "input_ids": encoded.input_ids[i], "labels": [0]} for i in rows],
                        tokenizer.pad_token_id)
        answers = answer_windows(model, tokenizer, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                 max_new_tokens, no_answer=unanswerable, num_beams=num_beams)
        for i, answer in zip(rows, answers):
            windows[encoded.ids[i], encoded.windows[i]] = answer
    result = collect_answers(questions, windows, snap, spellable_by(tokenizer))
    result.stats["windows"] = len(encoded.ids)
    return result
