"""lorakit: LoRA/QLoRA fine-tuning for QA and chat, evaluated honestly."""
from ._version import __version__
