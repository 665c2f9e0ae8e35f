"""One converter per input format: raw records -> canonical `Example`s (called by `formats.to_examples`)."""

from __future__ import annotations

import ast
import json
import math
from typing import Any

from ..errors import DataError
from .example import Example
from .loaders import RawData

# Counted in the cleaning report: SQuAD answers whose answer_start did not point at their text.
ANSWER_START_FIXED = "answer_start corrected to where the answer occurs"
ANSWER_NOT_IN_CONTEXT = "answer text not found in its context"
COLUMN_FIELDS = ("question", "answer", "context", "system", "id", "group")


# Column names accepted without a column_map, matched case-insensitively, first match wins.
ALIASES = {
    "question": ("question", "q", "query", "prompt"),
    "answer": ("answer", "a", "response", "completion", "reply"),
    "context": ("context", "passage", "paragraph", "document"),
    "system": ("system", "system_prompt"),
    "id": ("id", "qid", "question_id"),
    "group": ("group", "title"),
}


SQUAD_ANSWER_COLUMNS = ("answers", "answers.text")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _keys(records: list[dict]) -> dict[str, str]:
    """Lower-cased key -> the key as written, over the first records (files are mostly uniform)."""
    keys: dict[str, str] = {}
    for record in records[:200]:
        for key in record:
            keys.setdefault(str(key).strip().lower(), key)
    return keys


def _pick(keys: dict[str, str], candidates: tuple[str, ...]) -> str | None:
    for name in candidates:
        if name in keys:
            return keys[name]
    return None


def _text(value: Any, where: str, field: str) -> str:
    """A field's value as text; None and NaN are empty, numbers become their digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    raise DataError(
        f"{where}: field '{field}' is a {type(value).__name__}; expected text.",
        hint=f"make '{field}' a string in that record, or map another column to it with data.column_map",
    )


def _dedupe(answers: list[str]) -> list[str]:
    """Strip and de-duplicate reference answers, keeping their order."""
    seen, kept = set(), []
    for answer in answers:
        answer = answer.strip()
        if answer and answer not in seen:
            seen.add(answer)
            kept.append(answer)
    return kept


def _qa_example(question, answers, *, context, system, is_impossible, no_answer, id, source, group) -> Example:
    answers = [] if is_impossible else _dedupe(answers)
    target = no_answer if is_impossible else (answers[0] if answers else "")
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": target}]
    return Example(
        messages=messages,
        context=context or None,
        answers=answers,
        id=id,
        source=source,
        group=group or None,
        is_impossible=is_impossible,
    )


def _convert_squad(raw: RawData, no_answer: str) -> list[Example]:
    articles = raw.data["data"] if isinstance(raw.data, dict) else raw.data
    examples: list[Example] = []
    for a, article in enumerate(articles):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise DataError(
                f"{raw.name}: data[{a}] has no 'paragraphs' list.",
                hint='every article needs {"title", "paragraphs": [...]}',
            )
        title = _text(article.get("title"), f"{raw.name} data[{a}]", "title")
        for p, paragraph in enumerate(article["paragraphs"]):
            where_p = f"{raw.name} data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise DataError(f"{where_p} has no 'qas' list.", hint='every paragraph needs {"context", "qas": [...]}')
            context = _text(paragraph.get("context"), where_p, "context")
            for q, qa in enumerate(paragraph["qas"]):
                where = f"{where_p}.qas[{q}]"
                if not isinstance(qa, dict):
                    raise DataError(
                        f"{where} is not an object.", hint='each entry of qas needs {"id", "question", "answers"}'
                    )
                answers = qa.get("answers") or []
                if not isinstance(answers, list) or not all(isinstance(item, dict) for item in answers):
                    raise DataError(
                        f'{where}: field \'answers\' must be a list of {{"text", "answer_start"}}.',
                        hint="fix that record",
                    )
                texts = [_text(item.get("text"), where, "answers.text") for item in answers]
                _check_starts(raw, context, texts, [item.get("answer_start") for item in answers])
                index = len(examples)
                examples.append(
                    _qa_example(
                        _text(qa.get("question"), where, "question"),
                        texts,
                        context=context,
                        system=None,
                        is_impossible=bool(qa.get("is_impossible", False)),
                        no_answer=no_answer,
                        id=str(qa["id"]) if qa.get("id") is not None else f"{raw.stem}-{index}",
                        source=f"{raw.name}:{index}",
                        group=title or context,
                    )
                )
    return examples


def _check_starts(raw: RawData, context: str, texts: list[str], starts: list) -> list[int | None]:
    """SQuAD answer offsets, repaired where they do not point at the answer text: the start of
    the occurrence of the text nearest the given offset. Counts what was fixed (or could not be)
    in raw.counts, for the cleaning report; returns the corrected offsets."""
    fixed: list[int | None] = []
    for text, start in zip(texts, starts):
        if not isinstance(start, int) or isinstance(start, bool) or not text:
            fixed.append(start if isinstance(start, int) else None)
            continue
        if context[start : start + len(text)] == text:
            fixed.append(start)
            continue
        found = [i for i in range(len(context)) if context.startswith(text, i)]
        if found:
            fixed.append(min(found, key=lambda i: abs(i - start)))
            raw.counts[ANSWER_START_FIXED] += 1
        else:
            fixed.append(None)
            raw.counts[ANSWER_NOT_IN_CONTEXT] += 1
    return fixed


def _resolve_columns(raw: RawData, records: list[dict], fmt: str, column_map: dict) -> dict[str, str | None]:
    """Canonical field -> the record key that holds it: column_map first, then known aliases."""
    unknown = [name for name in column_map if name not in COLUMN_FIELDS]
    if unknown:
        raise DataError(
            f"data.column_map has unknown field(s) {', '.join(unknown)} (for {raw.name}).",
            hint=f"its keys are canonical fields: {', '.join(COLUMN_FIELDS)}; its values are your column names",
        )
    keys = _keys(records)
    columns: dict[str, str | None] = {}
    for name in COLUMN_FIELDS:
        if name in column_map:
            wanted = str(column_map[name])
            if wanted.strip().lower() not in keys:
                raise DataError(
                    f"{raw.name}: data.column_map.{name} is '{wanted}', but there is no such column; "
                    f"found {', '.join(map(str, keys.values()))}.",
                    hint=f"set data.column_map.{name} to one of those columns",
                )
            columns[name] = keys[wanted.strip().lower()]
        elif fmt == "columns":
            columns[name] = None
        elif name == "answer" and fmt == "squad_flat":
            columns[name] = _pick(keys, SQUAD_ANSWER_COLUMNS)
        else:
            columns[name] = _pick(keys, ALIASES[name])
    for name in ("question", "answer"):
        if columns[name] is None:
            raise DataError(
                f"{raw.name}: format {fmt} needs the {name} column; found {', '.join(map(str, keys.values()))}.",
                hint=f"name it with data.column_map, e.g. {{{name}: <your column>}}",
            )
    return columns


def _parse_answers(value: Any, where: str, field: str, structured: bool) -> list[str] | None:
    """Reference answers from a str, a list, or a SQuAD answers dict; None when the cell is empty.

    `structured` also parses strings that hold a JSON / Python list or dict (CSV exports of
    SQuAD columns); an empty list means "no answer exists" (SQuAD 2.0 convention).
    """
    if isinstance(value, str) and structured and value.strip()[:1] in ("[", "{"):
        for parse in (json.loads, ast.literal_eval):
            try:
                return _parse_answers(parse(value), where, field, structured=False)
            except (ValueError, SyntaxError):
                continue
        raise DataError(
            f"{where}: field '{field}' looks like a list or dict but cannot be parsed: {value[:80]!r}.",
            hint='write it as JSON, e.g. ["answer one", "answer two"] or {"text": ["answer"], "answer_start": [0]}',
        )
    if isinstance(value, dict):
        return _parse_answers(value.get("text"), where, f"{field}.text", structured=False)
    if isinstance(value, (list, tuple)):
        texts = [item.get("text") if isinstance(item, dict) else item for item in value]
        return [_text(text, where, field) for text in texts]
    text = _text(value, where, field)
    return [text] if text.strip() else None


def _convert_table(raw: RawData, records: list[dict], fmt: str, column_map: dict, no_answer: str) -> list[Example]:
    columns = _resolve_columns(raw, records, fmt, column_map)
    structured = columns["answer"] in SQUAD_ANSWER_COLUMNS or fmt == "squad_flat"
    examples = []
    for index, record in enumerate(records):
        where = raw.where(index)

        def field(name: str) -> str:  # called only within this iteration, so the loop variables are current
            return _text(record.get(columns[name]), where, columns[name]) if columns[name] else ""  # noqa: B023

        cell = record.get(columns["answer"])
        answers = _parse_answers(cell, where, columns["answer"], structured)
        if isinstance(cell, dict) and isinstance(cell.get("answer_start"), list) and answers:
            _check_starts(raw, field("context"), answers, cell["answer_start"])
        flagged = record.get("is_impossible") in (True, "true", "True", "1", 1)
        # An explicitly empty answer list marks an unanswerable question; a blank cell is missing data.
        impossible = flagged or (structured and answers == [])
        context = field("context")
        record_id = field("id")
        examples.append(
            _qa_example(
                field("question"),
                answers or [],
                context=context,
                system=field("system"),
                is_impossible=impossible,
                no_answer=no_answer,
                id=record_id or f"{raw.stem}-{index}",
                source=f"{raw.name}:{index}",
                group=field("group") or context,
            )
        )
    return examples


def _convert_alpaca(raw: RawData, index: int, record: dict) -> Example:
    where = raw.where(index)
    instruction = _text(record.get("instruction"), where, "instruction")
    extra = _text(record.get("input"), where, "input")
    output = _text(record.get("output"), where, "output")
    user = (
        f"{instruction}\n\n{extra}"
        if instruction.strip() and extra.strip()
        else (instruction if instruction.strip() else extra)
    )
    turns = []
    system = _text(record.get("system"), where, "system")
    if system.strip():
        turns.append(("system", system))
    history = record.get("history") or []  # LLaMA-Factory's earlier turns: [[user, assistant], ...]
    if not isinstance(history, list) or not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in history):
        raise DataError(
            f"{where}: field 'history' must be a list of [user, assistant] pairs.",
            hint="fix or remove 'history' in that record",
        )
    for pair in history:
        turns += [("user", _text(pair[0], where, "history")), ("assistant", _text(pair[1], where, "history"))]
    turns += [("user", user), ("assistant", output)]
    return _chat_example(raw, index, record, turns)


def _convert_sharegpt(raw: RawData, index: int, record: dict) -> Example:
    where = raw.where(index)
    conversation = record.get("conversations")
    if not isinstance(conversation, list):
        raise DataError(f"{where}: field 'conversations' must be a list of {{from, value}}.", hint="fix that record")
    turns = []
    system = _text(record.get("system"), where, "system")
    if system.strip():
        turns.append(("system", system))
    for t, turn in enumerate(conversation):
        field = f"conversations[{t}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{field}' must be an object {{from, value}}.", hint="fix that turn")
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(str(speaker).strip().lower())
        if role is None:
            raise DataError(
                f"{where}: field '{field}.from' is '{speaker}', not a known role (human, gpt, system).",
                hint="rename that role, or remove the turn (tool and function turns are not supported)",
            )
        turns.append((role, _text(turn.get("value", turn.get("content")), where, f"{field}.value")))
    return _chat_example(raw, index, record, turns)


def _convert_messages(raw: RawData, index: int, record: dict) -> Example:
    where = raw.where(index)
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise DataError(f"{where}: field 'messages' must be a list of {{role, content}}.", hint="fix that record")
    turns = []
    for m, message in enumerate(messages):
        field = f"messages[{m}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: field '{field}' must be an object {{role, content}}.", hint="fix that message")
        role = MESSAGE_ROLES.get(str(message.get("role")).strip().lower())
        if role is None:
            raise DataError(
                f"{where}: field '{field}.role' is '{message.get('role')}', not one of system, user, assistant.",
                hint="rename that role, or remove the message (tool messages are not supported)",
            )
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(
                part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
            )
        turns.append((role, _text(content, where, f"{field}.content")))
    return _chat_example(raw, index, record, turns)


def _chat_example(raw: RawData, index: int, record: dict, turns: list[tuple[str, str]]) -> Example:
    messages = [{"role": role, "content": content} for role, content in turns]
    last = messages[-1] if messages else None
    final = last["content"] if last and last["role"] == "assistant" else ""
    record_id = record.get("id")
    record_id = str(record_id) if isinstance(record_id, (str, int)) and str(record_id).strip() else ""
    return Example(
        messages=messages,
        answers=[final] if final.strip() else [],
        id=record_id or f"{raw.stem}-{index}",
        source=f"{raw.name}:{index}",
    )
