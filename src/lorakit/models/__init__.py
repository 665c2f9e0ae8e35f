"""Models: loading the base model and tokenizer, precision, k-bit quantization (kbit.py), LoRA, the base model's identity."""

from __future__ import annotations

import logging


class _QuietNotes(logging.Filter):
    """bitsandbytes' CPU backend logs, at import, that an optional hub kernel could not be fetched
    (it falls back to its own; lorakit never downloads), and its 8-bit matmul logs at every call
    that it casts its input to float16: the first is dropped, the second kept once."""

    seen_cast = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "kernels-community" in message:
            return False
        if "will be cast" in message:
            first, _QuietNotes.seen_cast = not _QuietNotes.seen_cast, True
            return first
        return True


def quiet_bitsandbytes_notes() -> None:
    """Install the filter on bitsandbytes' loggers before anything (peft, transformers) imports it."""
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietNotes) for f in logger.filters):
            logger.addFilter(_QuietNotes())


quiet_bitsandbytes_notes()
