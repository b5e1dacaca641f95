"""How a question is put to the model and how its answer comes back. No torch.

Two formats (`model.prompt`), each an input template and the answer taught for an unanswerable question:
- `flan`: FLAN's own SQuAD template, what FLAN-T5 was instruction-tuned on: the instruction (v2 adds how to decline),
  the context, then the question; the model answers "unanswerable" when the context does not say.
- `t5`: T5's SQuAD format (`question: ... context: ...`, as transformers' `run_seq2seq_qa.py` poses it); the model
  answers nothing (it ends at once) when the context does not say. Models trained here from random weights learn
  unanswerable questions far better this way (README, "Learning parity").
Either way the answer for "no answer" becomes "" in a predictions file. `model.no_answer` can teach the other
format's no-answer answer instead (an ablation: which part of a format helps a model learn unanswerable questions).
"""

from __future__ import annotations

from flan_squad.utils.errors import ConfigError

UNANSWERABLE = "unanswerable"
PROMPTS = ("flan", "t5")
NO_ANSWERS = ("format", "empty", "unanswerable")  # model.no_answer: the format's own, or either one whatever the format
VERSIONS = ("v1", "v2")

# FLAN's own SQuAD templates (the v2 one tells the model how to decline).
INSTRUCTIONS = {
    "v1": "Read this and answer the question.",
    "v2": f'Read this and answer the question. If the question is unanswerable, say "{UNANSWERABLE}".',
}


def around_context(prompt: str, version: str, question: str) -> tuple[str, str]:
    """The text before and after the context in the model's input (only the context is ever cut)."""
    if prompt == "t5":
        return f"question: {question.lstrip()} context:", ""
    return INSTRUCTIONS[version], question


def check_question_format(prompt: str, no_answer: str) -> None:
    """Refuses a `model.prompt` or `model.no_answer` this module does not know (read as the other choice otherwise)."""
    if prompt not in PROMPTS:
        raise ConfigError(f"model.prompt={prompt!r}: expected one of {', '.join(PROMPTS)}")
    if no_answer not in NO_ANSWERS:
        raise ConfigError(f"model.no_answer={no_answer!r}: expected one of {', '.join(NO_ANSWERS)}")


def no_answer_target(prompt: str, no_answer: str = "format") -> str:
    """What the model is taught to answer when the context does not say ("": end of sequence at once): the `prompt`
    format's own, unless `no_answer` (model.no_answer) names one."""
    if no_answer == "format":
        return "" if prompt == "t5" else UNANSWERABLE
    return "" if no_answer == "empty" else UNANSWERABLE


def answer_to_prediction(generated: str) -> str:
    """The text that goes into a predictions file: the "unanswerable" answer (and no answer) becomes ""."""
    text = generated.strip()
    return "" if text.lower() == UNANSWERABLE else text
