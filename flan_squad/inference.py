"""From model inputs to answers: batched greedy generation, decoded into prediction text.

Training validation, evaluation, prediction and the benchmarks all answer questions through here.
"""

from __future__ import annotations

import torch
from torch import nn

from flan_squad.data import answer_to_prediction


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers as prediction text ("" for "unanswerable")."""
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            do_sample=False, num_beams=1)
    return [answer_to_prediction(t) for t in tokenizer.batch_decode(output, skip_special_tokens=True)]
