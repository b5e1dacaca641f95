"""flan-squad: fine-tune FLAN-T5 on SQuAD v1.1/v2.0 with full fine-tuning, LoRA, QLoRA or IA3, and compare them."""

__version__ = "0.1.0"
