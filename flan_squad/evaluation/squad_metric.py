"""Validation's metric: every window's answer accumulated as tensors, then one answer per question and the
official SQuAD scores, as a torchmetrics `Metric`.

SQuAD F1 is not a sum over batches: a question's answer is chosen among its context windows, which may lie in
different batches (or processes), and v2's best-threshold figures need every no-answer probability at once. So
`update` only keeps tensors (question index, window index, generated token ids, log P(answer), log P("unanswerable"))
in list states with `dist_reduce_fx="cat"`, which torchmetrics gathers from every process at `compute()` as Lightning
expects; `compute()` then drops the repeats a distributed sampler pads with, picks each question's window and
snaps its answer (`flan_squad.evaluation.inference.collect_answers`) and scores all answers with the official rules
(`flan_squad.evaluation.metrics.score`, the one place they live) -- the "cat, then compute" pattern of torchmetrics'
AUROC.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from flan_squad.data.squad import Question
from flan_squad.evaluation.inference import Answers, WindowAnswer, collect_answers, spellable_by, window_answers
from flan_squad.evaluation.metrics import score


class ScoredAnswers:
    """What `SquadAnswers.compute()` gives: the official scores and the answers they scored. A plain class, not a
    dataclass: torchmetrics walks dataclasses in compute()'s result, and `Question`s are frozen ones."""

    def __init__(self, scores: dict[str, float], answers: Answers, questions: list[Question],
                 windows: dict[tuple[str, int], WindowAnswer]):
        self.scores, self.answers = scores, answers
        self.questions = questions  # those answered: all of the split unless validation was limited
        self.windows = windows  # every window's answer, by (question id, window number)


class SquadAnswers(Metric):
    """Every (question, window) answer of a validation pass; `compute()` scores the questions answered."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, tokenizer, version: str, max_new_tokens: int, snap_to_context: bool = True):
        super().__init__()
        self.tokenizer, self.version, self.width = tokenizer, version, max_new_tokens
        self.snap_to_context = snap_to_context
        self.questions: Sequence[Question] = ()
        self._index: dict[str, int] = {}
        for name in ("question", "window", "tokens", "logprob", "na_logprob"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def set_questions(self, questions: Sequence[Question]) -> None:
        """The split being validated, in the same order on every process: states hold indices into it."""
        self.questions, self._index = list(questions), {q.id: i for i, q in enumerate(questions)}

    def update(self, ids: Sequence[str], windows: Sequence[int], tokens: torch.Tensor, logprob: torch.Tensor,
               na_logprob: torch.Tensor | None) -> None:
        device = tokens.device
        self.question.append(torch.tensor([self._index[i] for i in ids], device=device))
        self.window.append(torch.as_tensor(windows, device=device).long())
        # One width for every batch, so that the states concatenate: pad after the answer, as generate does.
        self.tokens.append(torch.nn.functional.pad(tokens, (0, self.width - tokens.shape[1]),
                                                   value=self.tokenizer.pad_token_id))
        self.logprob.append(logprob.float())
        self.na_logprob.append(torch.full_like(logprob.float(), torch.nan) if na_logprob is None
                               else na_logprob.float())

    def compute(self) -> ScoredAnswers:
        question, window = dim_zero_cat(self.question).cpu(), dim_zero_cat(self.window).cpu()
        tokens, logprob = dim_zero_cat(self.tokens).cpu(), dim_zero_cat(self.logprob).cpu()
        na_logprob = dim_zero_cat(self.na_logprob).cpu()
        # A distributed sampler pads the last batches with repeats: one answer per (question, window), the first.
        first: dict[tuple[int, int], int] = {}
        for row, key in enumerate(zip(question.tolist(), window.tolist())):
            first.setdefault(key, row)
        keys = sorted(first, key=first.__getitem__)
        rows = torch.tensor([first[k] for k in keys], dtype=torch.long)
        has_na = not torch.isnan(na_logprob[rows]).any()
        answers = window_answers(self.tokenizer, tokens[rows], logprob[rows], na_logprob[rows] if has_na else None)
        windows = {(self.questions[q].id, w): answer for (q, w), answer in zip(keys, answers)}
        questions = [self.questions[i] for i in sorted({q for q, _ in keys})]
        collected = collect_answers(questions, windows, self.snap_to_context, spellable_by(self.tokenizer))
        return ScoredAnswers(score(self.version, questions, collected.predictions, collected.na_probs), collected,
                          questions, windows)

    def __repr__(self) -> str:  # the default prints the tokenizer
        return f"{type(self).__name__}(version={self.version!r}, max_new_tokens={self.width})"

