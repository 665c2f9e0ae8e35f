"""lorakit: LoRA/QLoRA fine-tuning for QA and chat, evaluated honestly."""
__version__ = "0.1.0"
