"""flan-squad: fine-tune FLAN-T5 on SQuAD v1.1/v2.0 with full fine-tuning, LoRA, QLoRA or IA3, and compare them."""

import os

# Before anything imports tokenizers: the dataloader may fork after tokenizing (tokenizers warns, or deadlocks).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
