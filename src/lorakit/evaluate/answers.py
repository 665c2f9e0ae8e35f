"""Answer extraction: the answer part of a generation, without thinking blocks, leftover tokens or prefixes."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..inference.decoding import _first_stop

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_LEFTOVERS = (
    "<|im_end|>",
    "<|im_start|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "</s>",
    "<s>",
    "<eos>",
    "<end_of_turn>",
)
_PREFIX = re.compile(r"^\s*(?:#+\s*)?(?:answer|a|assistant|response)\s*:\s*", re.IGNORECASE)
_QUOTES = ('""', "''", "“”", "‘’", "«»", "``")


def extract_answer(text: str, stop_strings: Sequence[str] = ()) -> str:
    """The answer inside a generated completion, for scoring.

    Cuts at the first stop string or end-of-turn marker, drops <think> blocks (an unclosed one
    runs to the end), a leading "Answer:" / "A:" / "### Answer:" / "Assistant:", and surrounding
    quotes and whitespace.
    """
    text = _THINK.sub("", text)
    cut = _first_stop(text, list(stop_strings) + list(_LEFTOVERS))
    if cut >= 0:
        text = text[:cut]
    text = text.strip()
    while True:
        stripped = _PREFIX.sub("", text, count=1).strip()
        if stripped == text:
            break
        text = stripped
    if len(text) >= 2 and any(text[0] == q[0] and text[-1] == q[1] for q in _QUOTES):
        text = text[1:-1].strip()
    return text
