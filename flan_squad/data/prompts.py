"""How a question is put to the model and how its answer comes back: FLAN's SQuAD instructions, and the answer
"unanswerable" that stands for SQuAD v2's empty answer. No torch."""

from __future__ import annotations

UNANSWERABLE = "unanswerable"

# FLAN's own SQuAD templates (the v2 one tells the model how to decline).
INSTRUCTIONS = {
    "v1": "Read this and answer the question.",
    "v2": f'Read this and answer the question. If the question is unanswerable, say "{UNANSWERABLE}".',
}


def answer_to_prediction(generated: str) -> str:
    """The text that goes into a predictions file: the "unanswerable" answer becomes ""."""
    text = generated.strip()
    return "" if text.lower() == UNANSWERABLE else text
