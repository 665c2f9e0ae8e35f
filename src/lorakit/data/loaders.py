"""Read a data file (or folder, or hub dataset) into plain Python objects, without interpreting it.

Text files are decoded with 'surrogateescape', so a record holding invalid UTF-8 bytes does not
stop the whole load: its bad bytes become lone surrogates, and `clean` drops that record with the
reason "invalid UTF-8" instead.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import DataError

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
    lines: Optional[list[int]] = field(default=None)

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
        return _READERS[kind](local)
    if _looks_like_hub_name(text_path):
        return _read_hub(text_path, hub_split)
    raise DataError(
        f"data file '{text_path}' does not exist (looked in {Path.cwd()}).",
        hint="check data.path; relative paths are read from the config file's folder or the current folder",
    )


def _looks_like_hub_name(text: str) -> bool:
    return bool(_HUB_NAME.match(text)) and Path(text).suffix.lower() not in SUFFIXES


def _decode(path: Path) -> str:
    # surrogateescape keeps invalid bytes as lone surrogates; clean.py drops those records.
    return path.read_bytes().decode("utf-8-sig", errors="surrogateescape")


def _read_json(path: Path) -> RawData:
    text = _decode(path)
    try:
        data = json.loads(text)
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
            hint="wrap the records in a JSON list, e.g. [{\"question\": ..., \"answer\": ...}]",
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
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: malformed JSON on line {number}, column {exc.colno}: {exc.msg}.",
                hint="each line of a JSONL file must be one complete JSON object; fix that line",
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}: line {number} is a JSON {type(record).__name__}, not an object.",
                hint="each line must be an object like {\"question\": ..., \"answer\": ...}",
            )
        records.append(record)
        lines.append(number)
    return RawData(data=records, path=str(path), name=path.name, kind=kind, lines=lines)


def _read_delimited(path: Path, delimiter: str, kind: str) -> RawData:
    csv.field_size_limit(sys.maxsize)  # long passages exceed the 128 KiB default
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise DataError(f"{path}: the file is empty or has no header row.", hint="put the column names on the first line")
    records, lines = [], []
    for row in reader:
        if None in row:
            raise DataError(
                f"{path}: line {reader.line_num} has more fields than the {len(reader.fieldnames)} header columns.",
                hint=f"quote values that contain '{delimiter}' or fix that line",
            )
        records.append({key.strip(): value for key, value in row.items()})
        lines.append(reader.line_num)
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
        raise DataError(f"{path}: cannot read Parquet: {exc}.", hint="re-export the file, e.g. with pandas.to_parquet") from None
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


_READERS = {
    "json": _read_json,
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "tsv": _read_tsv,
    "parquet": _read_parquet,
}
