"""Examples -> input_ids + labels, with completion-only labels and truncation that never cuts the answer.

Causal models: every segment from `render_segments` is tokenized on its own (so the prompt ids
at inference are exactly the prompt ids seen in training); labels are -100 on prompt segments
and the ids themselves on assistant replies. Templates that do not end a reply with an
end-of-turn marker get the EOS id appended after it, labelled, so the model learns to stop.

Too long: the context is shortened first (keeping its start, or a window around the answer when
the answer occurs in it); if the record still does not fit it is dropped with a reason.
Labels are never cut.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..data.example import Example
from ..errors import ModelError, TemplateError
from .templates import Template, render_prompt, render_segments

if TYPE_CHECKING:  # annotations only, no import cost
    from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    attention_mask: list[int] | None = None
    context_truncated: bool = False

    def to_feature(self) -> dict:
        mask = self.attention_mask if self.attention_mask is not None else [1] * len(self.input_ids)
        return {"input_ids": self.input_ids, "attention_mask": mask, "labels": self.labels}


@dataclass
class Dropped:
    reason: str


# --- token helpers ------------------------------------------------------------------------------


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ModelError(
            "the tokenizer has no eos_token, so the model could never learn to stop.",
            hint="use a tokenizer that defines eos_token, or set tokenizer.eos_token before training",
        )
    return tokenizer.eos_token_id


def _bos_prefix(tokenizer, text: str) -> list[int]:
    """[bos_id] when the tokenizer would add a BOS itself and the text does not already start with it."""
    bos = tokenizer.bos_token
    if tokenizer.bos_token_id is None or (bos and text.startswith(bos)):
        return []
    probe = tokenizer("a")["input_ids"]
    return [tokenizer.bos_token_id] if probe and probe[0] == tokenizer.bos_token_id else []


def _needs_eos(template: Template, reply: str, tokenizer) -> bool:
    """EOS goes after a reply unless the template already ends it with EOS or an end-of-turn marker."""
    endings = [tokenizer.eos_token or ""] + [s for s in template.stop_strings if s.strip()]
    return not any(end and reply.endswith(end) for end in endings)


def _encode_segments(template, tokenizer, segments, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    full = "".join(text for text, _ in segments)
    ids = _bos_prefix(tokenizer, full)
    labels = [IGNORE] * len(ids)
    for text, trained in segments:
        piece = _ids(tokenizer, text)
        ids += piece
        labels += piece if (trained or train_on_prompt) else [IGNORE] * len(piece)
        if trained and _needs_eos(template, text, tokenizer):
            ids.append(_eos_id(tokenizer))
            labels.append(_eos_id(tokenizer))
    return ids, labels


def encode_prompt(
    template: Template, tokenizer: PreTrainedTokenizerBase, messages: list[dict], context=None, system=None
) -> list[int]:
    """Prompt ids for inference, built exactly as training builds them (BOS, EOS after earlier
    replies in a multi-turn history), ending with the generation prompt."""
    if template.task_type == "seq2seq":
        return tokenizer(render_prompt(template, messages, context, system))["input_ids"]
    segments = render_segments(template, messages, context, system, add_generation_prompt=True)
    return _encode_segments(template, tokenizer, segments, train_on_prompt=False)[0]


# --- one example --------------------------------------------------------------------------------


def encode_example(
    example: Example,
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    system: str | None = None,
    task_type: str | None = None,
) -> Encoded | Dropped:
    """Encode one example, shortening its context if needed; Dropped (with a reason) if it cannot fit.

    task_type: "causal" or "seq2seq"; None uses the template's own.
    Raises:
        TemplateError: the template cannot render this conversation (the record's source is named).
    """
    task_type = task_type or template.task_type
    if not example.target:
        return Dropped("no assistant reply to train on (the conversation must end with an assistant turn)")

    if task_type == "seq2seq":
        labels = _ids(tokenizer, example.target) + [_eos_id(tokenizer)]
        if len(labels) > max_length:
            return Dropped(f"too long: the answer needs {len(labels)} tokens > max_length {max_length}")

        def build(context):  # only the encoder input has to fit; the labels were checked above
            prompt = render_prompt(template, example.prompt_messages(), context, system)
            return tokenizer(prompt)["input_ids"], labels

    else:

        def build(context):
            segments = render_segments(template, example.messages, context, system)
            return _encode_segments(template, tokenizer, segments, train_on_prompt)

    try:
        result = _fit(build, example, tokenizer, max_length)
    except TemplateError as exc:
        raise TemplateError(f"{example.source or example.id}: {exc.message}", hint=exc.hint) from None
    if isinstance(result, Dropped):
        return result
    (ids, labels), truncated = result
    return Encoded(ids, labels, [1] * len(ids), truncated)


def _fit(build: Callable, example: Example, tokenizer, max_length: int):
    """Return ((ids, labels), context_truncated), or Dropped."""
    encoded = build(example.context)
    needed = len(encoded[0])
    if needed <= max_length:
        return encoded, False
    if not example.context:
        return Dropped(
            f"too long: prompt+answer need {needed} tokens > max_length {max_length} and there is no context to shorten"
        )
    bare = build(None)
    if len(bare[0]) > max_length:
        return Dropped(
            f"too long: prompt+answer need {len(bare[0])} tokens > max_length {max_length} even without context"
        )
    spans = _context_spans(tokenizer, example.context)
    keep = len(spans) - (needed - max_length)
    while keep > 0:
        start = _window_start(spans, keep, example.context, example.target)
        shortened = example.context[spans[start][0] : spans[start + keep - 1][1]]
        encoded = build(shortened)
        over = len(encoded[0]) - max_length
        if over <= 0:
            return encoded, True
        keep -= over  # re-tokenizing at the cut can shift a token or two: try again
    return bare, True


def _context_spans(tokenizer, context: str) -> list[tuple[int, int]]:
    """Character span of each context token (whitespace-separated words for slow tokenizers)."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [tuple(span) for span in offsets]
    import re

    return [m.span() for m in re.finditer(r"\S+\s*", context)]


def _window_start(spans: list[tuple[int, int]], keep: int, context: str, answer: str) -> int:
    """Keep the start of the context, unless the answer occurs in it beyond the kept window:
    then centre a window on the answer (extractive QA needs the answer in the passage)."""
    at = context.find(answer) if answer else -1
    if at < 0:
        return 0
    first = next((i for i, (_, end) in enumerate(spans) if end > at), 0)
    last = max((i for i, (begin, _) in enumerate(spans) if begin < at + len(answer)), default=first) + 1
    if last <= keep or last - first > keep:
        return 0
    start = max(0, first - (keep - (last - first)) // 2)
    return min(start, len(spans) - keep)


# --- many examples ------------------------------------------------------------------------------


def length_percentiles(lengths: list[int]) -> dict[str, float]:
    """min / median / p95 / max of token counts (zeros for an empty list)."""
    if not lengths:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"min": ordered[0], "median": statistics.median(ordered), "p95": p95, "max": ordered[-1]}


@dataclass
class TokenizeStats:
    n_examples: int = 0
    n_context_truncated: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    lengths: list[int] = field(default_factory=list)
    n_label_tokens: int = 0
    n_total_tokens: int = 0

    def percentiles(self) -> dict[str, float]:
        return length_percentiles(self.lengths)

    def summary(self) -> str:
        p = self.percentiles()
        kept = len(self.lengths)
        share = 100 * self.n_label_tokens / self.n_total_tokens if self.n_total_tokens else 0.0
        lines = [
            f"{self.n_examples} examples: {kept} encoded, {len(self.dropped)} dropped,"
            f" {self.n_context_truncated} with the context shortened to fit",
            f"tokens per example: min {p['min']}, median {p['median']:g}, p95 {p['p95']}, max {p['max']}",
            f"trained tokens: {self.n_label_tokens} of {self.n_total_tokens} ({share:.1f}%)",
        ]
        lines += [f"  dropped {source or '?'}: {reason}" for source, reason in self.dropped[:10]]
        if len(self.dropped) > 10:
            lines.append(f"  ... and {len(self.dropped) - 10} more dropped")
        return "\n".join(lines)


def encode_examples(
    examples: list[Example],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    system: str | None = None,
    task_type: str | None = None,
) -> tuple[list[dict], TokenizeStats]:
    """Encode every example; features are dicts of input_ids, attention_mask, labels."""
    features, stats = [], TokenizeStats(n_examples=len(examples))
    for example in examples:
        result = encode_example(
            example,
            template,
            tokenizer,
            max_length=max_length,
            train_on_prompt=train_on_prompt,
            system=system,
            task_type=task_type,
        )
        if isinstance(result, Dropped):
            stats.dropped.append((example.source or example.id, result.reason))
            continue
        features.append(result.to_feature())
        stats.n_context_truncated += result.context_truncated
        stats.lengths.append(len(result.input_ids))
        stats.n_label_tokens += sum(1 for label in result.labels if label != IGNORE)
        stats.n_total_tokens += len(result.input_ids)
    return features, stats


# --- batching -----------------------------------------------------------------------------------


# --- inspection ---------------------------------------------------------------------------------


def render_marked_example(
    example: Example,
    template: Template,
    tokenizer=None,
    *,
    system: str | None = None,
    open_mark: str = "⟦",
    close_mark: str = "⟧",
) -> str:
    """One example as the model sees it in training, trained text wrapped in ⟦ ⟧.

    With a tokenizer, the EOS that tokenize appends after a reply is shown inside the marks.
    For seq2seq templates the prompt (encoder input) comes first, then the marked target.
    """
    segments = render_segments(template, example.messages, example.context, system)
    parts = []
    for text, trained in segments:
        if not trained:
            parts.append(text)
            continue
        eos = ""
        if (
            tokenizer is not None
            and tokenizer.eos_token
            and (template.task_type == "seq2seq" or _needs_eos(template, text, tokenizer))
        ):
            eos = tokenizer.eos_token
        separator = "\n" if template.task_type == "seq2seq" else ""
        parts.append(f"{separator}{open_mark}{text}{eos}{close_mark}")
    return "".join(parts)
