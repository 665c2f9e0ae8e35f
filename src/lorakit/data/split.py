"""Deterministic train/validation/test split, done before tokenization.

Grouped splits keep every record of a group (a SQuAD article, a passage) in one split, so a
model is never tested on a passage it was trained on. Groups are shuffled with the seed and each
goes to the split furthest below its target record count.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from .example import Example

SPLITS = ("train", "validation", "test")
SPLIT_BY = ("auto", "group", "context", "record")


@dataclass
class SplitResult:
    """The three splits, how records were grouped, and any warnings (e.g. an empty split)."""

    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    split_by: str = "record"
    units: int = 0
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in SPLITS}


def _fractions(split: Any) -> dict[str, float]:
    """Fractions from a SplitConfig or a mapping, renormalised to sum to 1."""
    values = {name: float(split[name] if isinstance(split, Mapping) else getattr(split, name)) for name in SPLITS}
    total = sum(values.values())
    if total <= 0 or any(value < 0 for value in values.values()):
        raise DataError(
            f"split fractions {values} must be non-negative with a positive sum.",
            hint="set data.split.train / validation / test, e.g. 0.9 / 0.05 / 0.05",
        )
    return {name: value / total for name, value in values.items()}


def _resolve_split_by(examples: list[Example], split_by: str) -> str:
    if split_by not in SPLIT_BY:
        raise DataError(f"unknown split_by '{split_by}'.", hint=f"use one of {', '.join(SPLIT_BY)}")
    if split_by == "auto":
        return "group" if any(example.group for example in examples) else "record"
    return split_by


def _unit_key(example: Example, index: int, split_by: str):
    # Records without a group (or context) form a unit of their own.
    value = {"group": example.group, "context": example.context}.get(split_by)
    return ("key", value) if value else ("record", index)


def split_examples(examples: list[Example], split: Any, seed: int = 42, split_by: str = "auto") -> SplitResult:
    """Split `examples` by the fractions in `split` (a SplitConfig or a mapping) and `seed`.

    Split sizes aim at the fractions counted in records. Each split keeps the file's order.
    When the fraction for train is positive, train is never left empty.

    Raises:
        DataError: the fractions or split_by are invalid.
    """
    fractions = _fractions(split)
    mode = _resolve_split_by(examples, split_by)
    units: dict[Any, list[int]] = {}
    for index, example in enumerate(examples):
        units.setdefault(_unit_key(example, index, mode), []).append(index)
    order = list(units)
    random.Random(seed).shuffle(order)

    total = len(examples)
    targets = {name: fractions[name] * total for name in SPLITS}
    assigned: dict[str, list[int]] = {name: [] for name in SPLITS}
    for key in order:
        members = units[key]
        # The split furthest below its target (relative to its size) takes the next unit. All
        # start tied and ties go to train first, so train is never empty when its fraction is > 0.
        open_splits = [name for name in SPLITS if targets[name] > 0]
        name = max(open_splits, key=lambda s: (targets[s] - len(assigned[s])) / targets[s])
        assigned[name].extend(members)

    notes = []
    for name in ("validation", "test"):
        if fractions[name] > 0 and not assigned[name] and total:
            notes.append(
                f"{name} is empty: only {len(units)} distinct {mode}(s) to split by; "
                f"add data or give an explicit data.{name}_path"
            )

    result = SplitResult(split_by=mode, units=len(units), notes=notes)
    for name in SPLITS:
        setattr(result, name, [examples[i] for i in sorted(assigned[name])])
    return result
