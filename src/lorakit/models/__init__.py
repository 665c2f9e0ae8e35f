"""Models: loading the base model and tokenizer, precision, LoRA, and the base model's identity."""
