"""The one canonical record that every input format is converted into, once, at load time."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """A conversation plus what evaluation needs.

    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]. For QA the user turn
        holds the question and the last assistant turn holds the training target (the first
        reference answer, or the configured no-answer text for unanswerable questions).
    context: the passage for extractive QA, kept apart so templates place it and truncation can
        shorten it without touching the question or answer.
    answers: every reference answer (SQuAD has several); empty for an unanswerable question.
    id: the record's own id when the file has one, else "<file stem>-<index>".
    source: where it came from, "file:record-index", for error messages and reports.
    group: the key that keeps related records in one split (SQuAD article title or passage).
    """

    messages: list[dict]
    context: str | None = None
    answers: list[str] = field(default_factory=list)
    id: str = ""
    source: str = ""
    group: str | None = None
    is_impossible: bool = False

    @property
    def question(self) -> str:
        """The last user turn (the question for QA)."""
        for message in reversed(self.messages):
            if message["role"] == "user":
                return message["content"]
        return ""

    @property
    def target(self) -> str:
        """The last assistant turn (the training target)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return ""

    def prompt_messages(self) -> list[dict]:
        """The conversation without its final assistant turn: what the model sees at inference."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[:-1]
        return list(self.messages)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "messages": self.messages,
            "context": self.context,
            "answers": self.answers,
            "source": self.source,
            "group": self.group,
            "is_impossible": self.is_impossible,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Example:
        return cls(
            messages=list(data["messages"]),
            context=data.get("context"),
            answers=list(data.get("answers") or []),
            id=str(data.get("id", "")),
            source=str(data.get("source", "")),
            group=data.get("group"),
            is_impossible=bool(data.get("is_impossible", False)),
        )


def extractive_share(examples: list[Example]) -> float | None:
    """The share of examples whose answer is a span of their passage (an unanswerable question
    counts: its no-answer text is allowed too); None when no example has a passage."""
    if not any(example.context for example in examples):
        return None
    spans = sum(1 for ex in examples if ex.context and (ex.is_impossible or (ex.target and ex.target in ex.context)))
    return spans / len(examples)
