"""Detect a data file's format and convert each record, once, into the canonical `Example`.

Formats: squad (official nested JSON, v1.1 and v2.0), squad_flat (question/context/answers
columns, like the hub's `squad`), qa (question/answer pairs, optional context), faq (an object
wrapping one list of question/answer pairs), alpaca, sharegpt, messages (OpenAI chat) and
columns (any table, through `column_map`).
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any, Optional

from ..errors import DataError
from .example import Example
from .loaders import RawData

# Counted in the cleaning report: SQuAD answers whose answer_start did not point at their text.
ANSWER_START_FIXED = "answer_start corrected to where the answer occurs"
ANSWER_NOT_IN_CONTEXT = "answer text not found in its context"

FORMATS = ("squad", "squad_flat", "qa", "faq", "alpaca", "sharegpt", "messages", "columns")
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
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
}
MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
KNOWN = (
    "squad ({data: [{title, paragraphs: [{context, qas}]}]}), squad_flat (question, context, answers), "
    "qa (question/answer, q/a, prompt/response, query/response, optional context), "
    "faq ({\"Questions\": [{question, answer}]}), alpaca (instruction, input, output), "
    "sharegpt (conversations: [{from, value}]), messages (messages: [{role, content}]), columns (any table + column_map)"
)


# --- detection -----------------------------------------------------------------------------


def detect_format(raw: RawData) -> str:
    """Name the format of `raw` (one of FORMATS except columns, which needs a column_map).

    Raises:
        DataError: nothing matches; the message lists the keys found and the known formats.
    """
    if _is_squad(raw.data):
        return "squad"
    records, wrapped = _records(raw)
    keys = _keys(records)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "output" in keys and ("instruction" in keys or "input" in keys):
        return "alpaca"
    if _pick(keys, ALIASES["question"]) and _pick(keys, SQUAD_ANSWER_COLUMNS):
        return "squad_flat"
    if _pick(keys, ALIASES["question"]) and _pick(keys, ALIASES["answer"]):
        return "faq" if wrapped else "qa"
    raise _unknown(raw, keys)


def _is_squad(data: Any) -> bool:
    articles = data.get("data") if isinstance(data, dict) else data
    return (
        isinstance(articles, list)
        and bool(articles)
        and isinstance(articles[0], dict)
        and isinstance(articles[0].get("paragraphs"), list)
    )


def _records(raw: RawData) -> tuple[list[dict], bool]:
    """The list of records, unwrapping an object that holds exactly one list of objects."""
    data, wrapped = raw.data, False
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list) and all(isinstance(v, dict) for v in value)]
        if len(lists) != 1:
            raise _unknown(raw, list(data.keys()), top_level=True)
        data, wrapped = data[lists[0]], True
    if not data:
        raise DataError(f"{raw.name}: the file holds no records.", hint="point data.path at the file that holds your records")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(
                f"{raw.where(index)} is a {type(record).__name__}, not an object with named fields.",
                hint="make every record an object such as {\"question\": ..., \"answer\": ...}",
            )
    return data, wrapped


def _keys(records: list[dict]) -> dict[str, str]:
    """Lower-cased key -> the key as written, over the first records (files are mostly uniform)."""
    keys: dict[str, str] = {}
    for record in records[:200]:
        for key in record:
            keys.setdefault(str(key).strip().lower(), key)
    return keys


def _pick(keys: dict[str, str], candidates: tuple[str, ...]) -> Optional[str]:
    for name in candidates:
        if name in keys:
            return keys[name]
    return None


def _unknown(raw: RawData, keys, top_level: bool = False) -> DataError:
    found = ", ".join(str(k) for k in keys) or "(none)"
    what = "top-level keys" if top_level else "keys/columns"
    return DataError(
        f"{raw.name}: cannot recognise the data format; found {what}: {found}. Known formats: {KNOWN}.",
        hint="name your columns with data.column_map, e.g. {question: <column>, answer: <column>, context: <column>}, "
        "or set data.format explicitly",
    )


# --- conversion ----------------------------------------------------------------------------


def to_examples(raw: RawData, fmt: str, *, column_map: Optional[dict] = None, no_answer: str = "unanswerable") -> list[Example]:
    """Convert every record of `raw` in format `fmt` to an `Example`.

    Raises:
        DataError: the format is unknown, its required keys are missing, or a record is
            malformed (the message names the file, record and field).
    """
    column_map = dict(column_map or {})
    if fmt not in FORMATS:
        raise DataError(f"{raw.name}: unknown format '{fmt}'.", hint=f"use auto or one of {', '.join(FORMATS)}")
    if column_map and fmt not in ("columns", "qa", "faq", "squad_flat"):
        raise DataError(
            f"{raw.name}: data.column_map is set but format '{fmt}' does not use it.",
            hint="use format columns (or auto) with a column_map, or remove the column_map",
        )
    if fmt == "squad":
        if not _is_squad(raw.data):
            raise DataError(
                f"{raw.name}: format squad needs {{\"data\": [{{\"title\", \"paragraphs\": [...]}}]}}; "
                f"found {_top_keys(raw.data)}.",
                hint="use format auto to detect the format, or squad_flat for question/context/answers columns",
            )
        return _convert_squad(raw, no_answer)
    records, _ = _records(raw)
    if fmt in ("alpaca", "sharegpt", "messages"):
        required = {"alpaca": ("output",), "sharegpt": ("conversations",), "messages": ("messages",)}[fmt]
        keys = _keys(records)
        missing = [key for key in required if key not in keys]
        if missing:
            raise DataError(
                f"{raw.name}: format {fmt} needs the key(s) {', '.join(missing)}; found {', '.join(map(str, keys.values()))}.",
                hint="use format auto to detect the format, or columns with a column_map",
            )
        convert = {"alpaca": _convert_alpaca, "sharegpt": _convert_sharegpt, "messages": _convert_messages}[fmt]
        return [convert(raw, index, record) for index, record in enumerate(records)]
    return _convert_table(raw, records, fmt, column_map, no_answer)


def _top_keys(data: Any) -> str:
    if isinstance(data, dict):
        return "keys " + ", ".join(map(str, data.keys()))
    return f"a list of {len(data)} records"


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
        messages=messages, context=context or None, answers=answers, id=id, source=source,
        group=group or None, is_impossible=is_impossible,
    )


def _convert_squad(raw: RawData, no_answer: str) -> list[Example]:
    articles = raw.data["data"] if isinstance(raw.data, dict) else raw.data
    examples: list[Example] = []
    for a, article in enumerate(articles):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise DataError(f"{raw.name}: data[{a}] has no 'paragraphs' list.", hint="every article needs {\"title\", \"paragraphs\": [...]}")
        title = _text(article.get("title"), f"{raw.name} data[{a}]", "title")
        for p, paragraph in enumerate(article["paragraphs"]):
            where_p = f"{raw.name} data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise DataError(f"{where_p} has no 'qas' list.", hint="every paragraph needs {\"context\", \"qas\": [...]}")
            context = _text(paragraph.get("context"), where_p, "context")
            for q, qa in enumerate(paragraph["qas"]):
                where = f"{where_p}.qas[{q}]"
                if not isinstance(qa, dict):
                    raise DataError(f"{where} is not an object.", hint="each entry of qas needs {\"id\", \"question\", \"answers\"}")
                answers = qa.get("answers") or []
                if not isinstance(answers, list) or not all(isinstance(item, dict) for item in answers):
                    raise DataError(f"{where}: field 'answers' must be a list of {{\"text\", \"answer_start\"}}.", hint="fix that record")
                texts = [_text(item.get("text"), where, "answers.text") for item in answers]
                _check_starts(raw, context, texts, [item.get("answer_start") for item in answers])
                index = len(examples)
                examples.append(_qa_example(
                    _text(qa.get("question"), where, "question"),
                    texts,
                    context=context, system=None, is_impossible=bool(qa.get("is_impossible", False)),
                    no_answer=no_answer, id=str(qa["id"]) if qa.get("id") is not None else f"{raw.stem}-{index}",
                    source=f"{raw.name}:{index}", group=title or context,
                ))
    return examples


def _check_starts(raw: RawData, context: str, texts: list[str], starts: list) -> list[Optional[int]]:
    """SQuAD answer offsets, repaired where they do not point at the answer text: the start of
    the occurrence of the text nearest the given offset. Counts what was fixed (or could not be)
    in raw.counts, for the cleaning report; returns the corrected offsets."""
    fixed: list[Optional[int]] = []
    for text, start in zip(texts, starts):
        if not isinstance(start, int) or isinstance(start, bool) or not text:
            fixed.append(start if isinstance(start, int) else None)
            continue
        if context[start:start + len(text)] == text:
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


def _resolve_columns(raw: RawData, records: list[dict], fmt: str, column_map: dict) -> dict[str, Optional[str]]:
    """Canonical field -> the record key that holds it: column_map first, then known aliases."""
    unknown = [name for name in column_map if name not in COLUMN_FIELDS]
    if unknown:
        raise DataError(
            f"data.column_map has unknown field(s) {', '.join(unknown)} (for {raw.name}).",
            hint=f"its keys are canonical fields: {', '.join(COLUMN_FIELDS)}; its values are your column names",
        )
    keys = _keys(records)
    columns: dict[str, Optional[str]] = {}
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


def _parse_answers(value: Any, where: str, field: str, structured: bool) -> Optional[list[str]]:
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

        def field(name: str) -> str:
            return _text(record.get(columns[name]), where, columns[name]) if columns[name] else ""

        cell = record.get(columns["answer"])
        answers = _parse_answers(cell, where, columns["answer"], structured)
        if isinstance(cell, dict) and isinstance(cell.get("answer_start"), list) and answers:
            _check_starts(raw, field("context"), answers, cell["answer_start"])
        flagged = record.get("is_impossible") in (True, "true", "True", "1", 1)
        # An explicitly empty answer list marks an unanswerable question; a blank cell is missing data.
        impossible = flagged or (structured and answers == [])
        context = field("context")
        record_id = field("id")
        examples.append(_qa_example(
            field("question"), answers or [], context=context, system=field("system"),
            is_impossible=impossible, no_answer=no_answer, id=record_id or f"{raw.stem}-{index}",
            source=f"{raw.name}:{index}", group=field("group") or context,
        ))
    return examples


def _convert_alpaca(raw: RawData, index: int, record: dict) -> Example:
    where = raw.where(index)
    instruction = _text(record.get("instruction"), where, "instruction")
    extra = _text(record.get("input"), where, "input")
    output = _text(record.get("output"), where, "output")
    user = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else (instruction if instruction.strip() else extra)
    turns = []
    system = _text(record.get("system"), where, "system")
    if system.strip():
        turns.append(("system", system))
    history = record.get("history") or []  # LLaMA-Factory's earlier turns: [[user, assistant], ...]
    if not isinstance(history, list) or not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in history):
        raise DataError(f"{where}: field 'history' must be a list of [user, assistant] pairs.", hint="fix or remove 'history' in that record")
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
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
        turns.append((role, _text(content, where, f"{field}.content")))
    return _chat_example(raw, index, record, turns)


def _chat_example(raw: RawData, index: int, record: dict, turns: list[tuple[str, str]]) -> Example:
    messages = [{"role": role, "content": content} for role, content in turns]
    last = messages[-1] if messages else None
    final = last["content"] if last and last["role"] == "assistant" else ""
    record_id = record.get("id")
    record_id = str(record_id) if isinstance(record_id, (str, int)) and str(record_id).strip() else ""
    return Example(
        messages=messages, answers=[final] if final.strip() else [], id=record_id or f"{raw.stem}-{index}",
        source=f"{raw.name}:{index}",
    )
