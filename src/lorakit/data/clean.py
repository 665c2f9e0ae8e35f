"""Normalise text and drop unusable examples, each with a stated reason: nothing is dropped silently."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace

from .example import Example

# Lone surrogates are what the loaders' 'surrogateescape' decoding makes of invalid UTF-8 bytes.
_SURROGATE = re.compile("[\ud800-\udfff]")

INVALID_UTF8 = "invalid UTF-8"
NO_USER = "no user turn"
NO_ASSISTANT = "no assistant turn"
NOT_ENDING_WITH_ASSISTANT = "does not end with an assistant turn"
EMPTY_QUESTION = "empty question"
EMPTY_ANSWER = "empty answer"
EMPTY_TURN = "empty turn"
DUPLICATE = "duplicate"


@dataclass
class CleanReport:
    """What cleaning kept, and every dropped record as (source, reason)."""

    kept: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)
    repaired: Counter = field(default_factory=Counter)  # kept records with a repaired or suspect field

    @property
    def counts(self) -> dict[str, int]:
        """Dropped records per reason, most common first."""
        return dict(Counter(reason for _, reason in self.dropped).most_common())

    @property
    def total(self) -> int:
        return self.kept + len(self.dropped)

    def merge(self, other: CleanReport) -> CleanReport:
        return CleanReport(
            kept=self.kept + other.kept, dropped=self.dropped + other.dropped, repaired=self.repaired + other.repaired
        )

    def summary(self, examples_shown: int = 3) -> str:
        """One line of totals, then one line per reason with a few sources as examples."""
        lines = [f"kept {self.kept} of {self.total} records, dropped {len(self.dropped)}"]
        for reason, count in self.counts.items():
            sources = [source for source, why in self.dropped if why == reason][:examples_shown]
            more = ", ..." if count > len(sources) else ""
            lines.append(f"  {reason}: {count} ({', '.join(sources)}{more})")
        lines += [f"  kept, {what}: {count}" for what, count in self.repaired.items()]
        return "\n".join(lines)


def _nfc(text):
    return unicodedata.normalize("NFC", text) if isinstance(text, str) else text


def _texts(example: Example) -> list[str]:
    texts = [message["content"] for message in example.messages] + list(example.answers)
    return texts + [text for text in (example.context, example.group) if text]


def _problem(example: Example) -> str | None:
    """Why this example cannot be trained or evaluated on, or None when it is usable."""
    if any(_SURROGATE.search(text) for text in _texts(example)):
        return INVALID_UTF8
    roles = [message["role"] for message in example.messages]
    if "user" not in roles:
        return NO_USER
    if "assistant" not in roles:
        return NO_ASSISTANT
    if roles[-1] != "assistant":
        return NOT_ENDING_WITH_ASSISTANT
    if not example.question.strip():
        return EMPTY_QUESTION
    if not example.target.strip():
        return EMPTY_ANSWER
    if any(not message["content"].strip() for message in example.messages if message["role"] != "system"):
        return EMPTY_TURN
    return None


def normalize_example(example: Example) -> Example:
    """The same example with every text NFC-normalised (one spelling per character)."""
    return replace(
        example,
        messages=[{**message, "content": _nfc(message["content"])} for message in example.messages],
        context=_nfc(example.context),
        answers=[_nfc(answer) for answer in example.answers],
        group=_nfc(example.group),
    )


def clean_examples(examples: list[Example], deduplicate: bool = True) -> tuple[list[Example], CleanReport]:
    """NFC-normalise and drop invalid, incomplete and (optionally) duplicate examples.

    Two examples are duplicates when their messages and context are the same; the first is kept.
    """
    report = CleanReport()
    kept: list[Example] = []
    seen: set = set()
    for example in examples:
        reason = _problem(example)
        if reason is None:
            example = normalize_example(example)
            key = (tuple((m["role"], m["content"]) for m in example.messages), example.context)
            if deduplicate and key in seen:
                reason = DUPLICATE
            seen.add(key)
        if reason is None:
            kept.append(example)
        else:
            report.dropped.append((example.source, reason))
    report.kept = len(kept)
    return kept, report
