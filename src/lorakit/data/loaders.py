"""Read a data file (or folder, or hub dataset) into plain Python objects, without interpreting it.

Text files are decoded with 'surrogateescape', so a record holding invalid UTF-8 bytes does not
stop the whole load: its bad bytes become lone surrogates, and `clean` drops that record with the
reason "invalid UTF-8" instead.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..files import wide_encoding

logger = logging.getLogger("lorakit.data")

SUFFIXES = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# "squad" or "owner/name": what a hub dataset name looks like (never a file with a suffix).
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class RawData:
    """What a file holds, before any format is applied.

    data: the parsed JSON document (a list or a dict) for .json, else a list of row dicts.
    name: the file name (or hub name) used in `Example.source` and error messages.
    lines: for JSONL and CSV/TSV, the line number of each record, for error messages.
    """

    data: Any
    path: str
    name: str
    kind: str
    lines: list[int] | None = field(default=None)
    counts: Counter = field(default_factory=Counter)  # records repaired while converting, by what

    @property
    def stem(self) -> str:
        return Path(self.name).stem if self.kind != "hub" else self.name.replace("/", "_")

    def where(self, index: int) -> str:
        """'file.jsonl record 3 (line 4)': where record `index` is, for error messages."""
        line = f" (line {self.lines[index]})" if self.lines and index < len(self.lines) else ""
        return f"{self.name} record {index}{line}"


def read_raw(path: str | Path, hub_split: str = "train") -> RawData:
    """Read a local file or `save_to_disk` folder, or else a hub dataset by name.

    Raises:
        DataError: the path does not exist (and is not a hub name), the file type is unknown,
            JSON/JSONL is malformed (the message gives the line), or a CSV row is ragged.
    """
    text_path = str(path)
    local = Path(text_path).expanduser()
    if local.is_dir():
        return _read_saved_dataset(local, hub_split)
    if local.is_file():
        kind = SUFFIXES.get(local.suffix.lower())
        if kind is None:
            raise DataError(
                f"{local}: unknown file type '{local.suffix}'.",
                hint=f"use one of {', '.join(sorted(SUFFIXES))}, or a folder saved with datasets' save_to_disk",
            )
        raw = _READERS[kind](local)
        if not raw.data:
            raise DataError(
                f"{local}: the file holds no records.",
                hint="point data.path at the file that holds your records",
            )
        return raw
    if _looks_like_hub_name(text_path):
        return _read_hub(text_path, hub_split)
    raise DataError(
        f"data file '{text_path}' does not exist (looked in {Path.cwd()}).",
        hint="check data.path; relative paths are read from the config file's folder or the current folder",
    )


def _looks_like_hub_name(text: str) -> bool:
    return bool(_HUB_NAME.match(text)) and Path(text).suffix.lower() not in SUFFIXES


def read_bytes(path: Path) -> bytes:
    """A user's file as bytes; missing, unreadable or folder paths become a DataError."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"{path}: cannot read the file: {exc.strerror}.", hint="check the path and its permissions"
        ) from None


def _decode(path: Path) -> str:
    data = read_bytes(path)
    encoding = wide_encoding(data)
    if encoding:
        raise DataError(
            f"{path}: the file is encoded as {encoding}, not UTF-8.",
            hint="re-save it as UTF-8 (in most editors: Save As -> Encoding: UTF-8)",
        )
    if not data.strip():
        raise DataError(f"{path}: the file is empty.", hint="point data.path at the file that holds your records")
    # surrogateescape keeps invalid bytes as lone surrogates; clean.py drops those records.
    return data.decode("utf-8-sig", errors="surrogateescape")


class _DuplicateKeys:
    """object_pairs_hook that builds dicts like json does (the last value wins) and remembers
    duplicated keys; the C parser keeps no positions, so lines are found only when one occurs."""

    def __init__(self):
        self.found: list[str] = []

    def __call__(self, pairs):
        result = dict(pairs)
        if len(result) != len(pairs):
            seen = set()
            self.found += [key for key, _ in pairs if key in seen or seen.add(key)]
        return result


def _loads(text: str, path: Path, line: int | None = None) -> Any:
    """json.loads with one-line errors for what the json module reports as Python exceptions.

    line: the line of `text` in the file (JSON Lines), for messages.
    Raises json.JSONDecodeError for syntax errors, which callers word themselves.
    """
    hook = _DuplicateKeys()
    where = f"line {line}" if line else "the file"
    try:
        data = json.loads(text, object_pairs_hook=hook)
    except RecursionError:
        raise DataError(
            f"{path}: {where} nests lists or objects too deeply to read.",
            hint="records need only a few levels of nesting; re-export the data flat",
        ) from None
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError) or "digits" not in str(exc):
            raise
        # Python refuses to convert integers longer than sys.get_int_max_str_digits()
        match = re.search(r"\d{%d,}" % (sys.get_int_max_str_digits() + 1), text)  # noqa: UP031 (regex braces)
        number_line = (line or 1) + (text.count("\n", 0, match.start()) if match else 0)
        raise DataError(
            f"{path}: line {number_line} holds a number with more than {sys.get_int_max_str_digits()} digits.",
            hint="write such values as strings (in quotes), or remove them",
        ) from None
    if hook.found:
        for key in dict.fromkeys(hook.found):
            key_line = line or _line_of_key(text, key)
            logger.warning("warning: %s line %s: duplicate key '%s'; the last value is used.", path, key_line, key)
    return data


def _line_of_key(text: str, key: str) -> int:
    """The line of the second occurrence of `"key":` (the first duplicate), for the warning."""
    needle = re.compile(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:")
    positions = [m.start() for m in needle.finditer(text)][:2]
    return text.count("\n", 0, positions[-1]) + 1 if positions else 1


def _read_json(path: Path) -> RawData:
    text = _decode(path)
    try:
        data = _loads(text, path)
    except json.JSONDecodeError as exc:
        # A .json file that is really JSON Lines (very common): read it line by line instead.
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_jsonl(text, path, kind="json")
        raise DataError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}.",
            hint="fix the file there (a missing comma or quote is the usual cause)",
        ) from None
    if not isinstance(data, (list, dict)):
        raise DataError(
            f"{path}: the top level is a {type(data).__name__}; expected a list of records or an object.",
            hint='wrap the records in a JSON list, e.g. [{"question": ..., "answer": ...}]',
        )
    return RawData(data=data, path=str(path), name=path.name, kind="json")


def _read_jsonl(path: Path) -> RawData:
    return _parse_jsonl(_decode(path), path, kind="jsonl")


def _parse_jsonl(text: str, path: Path, kind: str) -> RawData:
    records, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = _loads(line, path, line=number)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: malformed JSON on line {number}, column {exc.colno}: {exc.msg}.",
                hint="each line of a JSONL file must be one complete JSON object; fix that line",
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}: line {number} is a JSON {type(record).__name__}, not an object.",
                hint='each line must be an object like {"question": ..., "answer": ...}',
            )
        records.append(record)
        lines.append(number)
    return RawData(data=records, path=str(path), name=path.name, kind=kind, lines=lines)


def _read_delimited(path: Path, delimiter: str, kind: str) -> RawData:
    csv.field_size_limit(sys.maxsize)  # long passages exceed the 128 KiB default
    # restval marks short rows: DictReader would otherwise fill them with None silently
    # typeshed wants a str restval; csv stores any object there, and the sentinel must not be a string
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""), delimiter=delimiter, restval=_MISSING)  # type: ignore[call-overload]
    records, lines = [], []
    try:
        if not reader.fieldnames:
            raise DataError(f"{path}: the file has no header row.", hint="put the column names on the first line")
        width = len(reader.fieldnames)
        for row in reader:
            if None in row or _MISSING in row.values():
                count = width + len(row.get(None, [])) - list(row.values()).count(_MISSING)
                raise DataError(
                    f"{path}: line {reader.line_num} has {count} field{'' if count == 1 else 's'} but the header has {width} columns.",
                    hint=f"quote values that contain '{delimiter}', and give every row all {width} fields (empty ones as {delimiter}{delimiter})",
                )
            records.append({key.strip(): value for key, value in row.items()})
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise DataError(
            f"{path}: line {reader.line_num}: malformed {kind.upper()}: {exc}.", hint="fix the quoting on that line"
        ) from None
    return RawData(data=records, path=str(path), name=path.name, kind=kind, lines=lines)


def _read_csv(path: Path) -> RawData:
    return _read_delimited(path, ",", "csv")


def _read_tsv(path: Path) -> RawData:
    return _read_delimited(path, "\t", "tsv")


def _read_parquet(path: Path) -> RawData:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(
            f"{path}: cannot read Parquet: {exc}.", hint="re-export the file, e.g. with pandas.to_parquet"
        ) from None
    return RawData(data=table.to_pylist(), path=str(path), name=path.name, kind="parquet")


def _read_saved_dataset(folder: Path, hub_split: str) -> RawData:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except FileNotFoundError:
        raise DataError(
            f"{folder}: is a folder but not one written by datasets' save_to_disk.",
            hint="point data.path at a data file, or at a folder made with Dataset.save_to_disk",
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded.keys())
        if hub_split in loaded:
            loaded = loaded[hub_split]
        elif len(names) == 1:
            loaded = loaded[names[0]]
        else:
            raise DataError(
                f"{folder}: holds splits {names} but not '{hub_split}'.",
                hint=f"set data.hub_split to one of {names}",
            )
    return RawData(data=loaded.to_list(), path=str(folder), name=folder.name, kind="saved")


def _read_hub(name: str, hub_split: str) -> RawData:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=hub_split)
    except Exception as exc:  # network, missing dataset, missing split: all one user-facing fix
        raise DataError(
            f"'{name}' is not a local file or folder, and loading it as a hub dataset (split '{hub_split}') failed: {exc}",
            hint="check the path for typos, or the hub dataset name and data.hub_split",
        ) from None
    return RawData(data=loaded.to_list(), path=name, name=name, kind="hub")


_MISSING = object()

_READERS = {
    "json": _read_json,
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "tsv": _read_tsv,
    "parquet": _read_parquet,
}
