"""The data stage: read a file, detect its format, convert to `Example`, clean, split.

load_examples(path)       one file -> LoadedData(examples, format, report)
load_splits(data_config)  the configured files -> DataSplits(train, validation, test, ...)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DataError
from .clean import CleanReport, clean_examples
from .example import Example
from .formats import FORMATS, detect_format, to_examples
from .loaders import RawData, read_raw
from .split import SplitResult, split_examples

__all__ = [
    "CleanReport",
    "DataSplits",
    "Example",
    "FORMATS",
    "LoadedData",
    "RawData",
    "SplitResult",
    "clean_examples",
    "detect_format",
    "load_examples",
    "load_splits",
    "read_raw",
    "split_examples",
    "to_examples",
]

LEAKED = "also in a validation/test file"


@dataclass
class LoadedData:
    """One file's cleaned examples, the format they were read as, and what cleaning dropped."""

    examples: list[Example]
    format: str
    report: CleanReport


@dataclass
class DataSplits:
    """The splits training and evaluation use, plus how they were made."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    format: str
    report: CleanReport
    split_by: str = "record"
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def load_examples(
    path: str,
    *,
    format: str = "auto",
    column_map: dict | None = None,
    no_answer: str = "unanswerable",
    hub_split: str = "train",
    deduplicate: bool = True,
) -> LoadedData:
    """Read one file (or folder, or hub dataset), convert it to examples and clean them.

    With format "auto", a column_map selects the "columns" format; otherwise the format is
    detected from the keys of the records.

    Raises:
        DataError: the file is missing or malformed, its format is unknown, or a record is bad.
    """
    raw = read_raw(path, hub_split=hub_split)
    if format == "auto":
        format = "columns" if column_map else detect_format(raw)
    examples = to_examples(raw, format, column_map=column_map, no_answer=no_answer)
    kept, report = clean_examples(examples, deduplicate=deduplicate)
    report.repaired.update(raw.counts)
    return LoadedData(examples=kept, format=format, report=report)


def load_splits(data_config) -> DataSplits:
    """Load the configured data and split it (a `DataConfig`).

    An explicit validation_path / test_path replaces that split; the ratio split shares the main
    file among the remaining splits, in proportion to their fractions. max_records keeps the first
    N records of the main file after cleaning (file order). Training records that also appear in a
    validation/test file are dropped and reported.

    Raises:
        DataError: any file cannot be loaded, or nothing usable is left for training.
    """

    def load(path: str) -> LoadedData:
        return load_examples(
            path,
            format=data_config.format,
            column_map=data_config.column_map or None,
            no_answer=data_config.no_answer,
            hub_split=data_config.hub_split,
            deduplicate=data_config.deduplicate,
        )

    main = load(data_config.path)
    report = main.report
    notes: list[str] = []
    examples = main.examples
    if data_config.max_records is not None and len(examples) > data_config.max_records:
        notes.append(f"max_records: kept the first {data_config.max_records} of {len(examples)} cleaned records")
        examples = examples[: data_config.max_records]

    explicit: dict[str, list[Example]] = {}
    for name in ("validation", "test"):
        extra_path = getattr(data_config, f"{name}_path")
        if extra_path:
            loaded = load(extra_path)
            report = report.merge(loaded.report)
            explicit[name] = loaded.examples
            notes.append(f"{name}: {len(loaded.examples)} records from {extra_path} ({loaded.format})")

    fractions = {name: getattr(data_config.split, name) for name in ("train", "validation", "test")}
    for name in explicit:
        fractions[name] = 0.0
    if sum(fractions.values()) == 0:
        fractions["train"] = 1.0  # every other split is given by its own file
    result = split_examples(examples, fractions, seed=data_config.seed, split_by=data_config.split_by)
    notes += result.notes
    train = _drop_leaked(result.train, [ex for held in explicit.values() for ex in held], report)

    if not train and fractions["train"] > 0:
        dropped = ", ".join(f"{reason}: {count}" for reason, count in report.counts.items()) or "none"
        raise DataError(
            f"{data_config.path}: no usable training records are left (kept {report.kept} of {report.total}; dropped {dropped}).",
            hint="check the file's format and fields, or set data.format / data.column_map",
        )
    return DataSplits(
        train=train,
        validation=explicit.get("validation", result.validation),
        test=explicit.get("test", result.test),
        format=main.format,
        report=report,
        split_by=result.split_by,
        notes=notes,
    )


def _drop_leaked(train: list[Example], held_out: list[Example], report: CleanReport) -> list[Example]:
    """Remove training records identical to a held-out record, so evaluation stays honest."""
    if not held_out:
        return train

    def key(example: Example):
        return (tuple((m["role"], m["content"]) for m in example.messages), example.context)

    held = {key(example) for example in held_out}
    kept = []
    for example in train:
        if key(example) in held:
            report.dropped.append((example.source, LEAKED))
        else:
            kept.append(example)
    report.kept -= len(train) - len(kept)
    return kept
