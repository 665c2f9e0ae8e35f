"""Detect a data file's format and convert each record, once, into the canonical `Example`.

Formats: squad (official nested JSON, v1.1 and v2.0), squad_flat (question/context/answers
columns, like the hub's `squad`), qa (question/answer pairs, optional context), faq (an object
wrapping one list of question/answer pairs), alpaca, sharegpt, messages (OpenAI chat) and
columns (any table, through `column_map`).
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from .converters import (
    ALIASES,
    SQUAD_ANSWER_COLUMNS,
    _convert_alpaca,
    _convert_messages,
    _convert_sharegpt,
    _convert_squad,
    _convert_table,
    _keys,
    _pick,
)
from .example import Example
from .loaders import RawData

FORMATS = ("squad", "squad_flat", "qa", "faq", "alpaca", "sharegpt", "messages", "columns")

KNOWN = (
    "squad ({data: [{title, paragraphs: [{context, qas}]}]}), squad_flat (question, context, answers), "
    "qa (question/answer, q/a, prompt/response, query/response, optional context), "
    'faq ({"Questions": [{question, answer}]}), alpaca (instruction, input, output), '
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
        lists = [
            key for key, value in data.items() if isinstance(value, list) and all(isinstance(v, dict) for v in value)
        ]
        if len(lists) != 1:
            raise _unknown(raw, list(data.keys()), top_level=True)
        data, wrapped = data[lists[0]], True
    if not data:
        raise DataError(
            f"{raw.name}: the file holds no records.", hint="point data.path at the file that holds your records"
        )
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(
                f"{raw.where(index)} is a {type(record).__name__}, not an object with named fields.",
                hint='make every record an object such as {"question": ..., "answer": ...}',
            )
    return data, wrapped


def _unknown(raw: RawData, keys, top_level: bool = False) -> DataError:
    found = ", ".join(str(k) for k in keys) or "(none)"
    what = "top-level keys" if top_level else "keys/columns"
    return DataError(
        f"{raw.name}: cannot recognise the data format; found {what}: {found}. Known formats: {KNOWN}.",
        hint="name your columns with data.column_map, e.g. {question: <column>, answer: <column>, context: <column>}, "
        "or set data.format explicitly",
    )


# --- conversion ----------------------------------------------------------------------------


def to_examples(
    raw: RawData, fmt: str, *, column_map: dict | None = None, no_answer: str = "unanswerable"
) -> list[Example]:
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
                f'{raw.name}: format squad needs {{"data": [{{"title", "paragraphs": [...]}}]}}; '
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
