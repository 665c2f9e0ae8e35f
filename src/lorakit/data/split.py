"""Deterministic train/validation/test split, done before tokenization.

Grouped splits keep every record of a group (a SQuAD article, a passage) in one split, so a
model is never tested on a passage it was trained on. Groups are shuffled with the seed and each
goes to the split furthest below its target record count.

Whole articles cannot always meet the asked ratios: the first 1,000 SQuAD questions come from
two articles (810 and 190), so a 5% validation split by article holds 19% of them, or 81%. So
`split_by: auto` checks each split's share of the records against its asked fraction, with a
tolerance of max(SHARE_TOLERANCE_POINTS, SHARE_TOLERANCE_RELATIVE x fraction) (for 5%: 2.5% to
7.5%; an empty split that was asked for always misses); when whole articles miss it and whole
passages come closer, it splits by passage and says so in a note. Either way records that share a passage always share a split.
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
# how far a split's share of the records may miss its asked fraction before `auto` gives up whole
# articles for whole passages: 2 points, or half the fraction when that is more
SHARE_TOLERANCE_POINTS = 0.02
SHARE_TOLERANCE_RELATIVE = 0.5


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


def _units(examples: list[Example], split_by: str) -> list[list[int]]:
    """Record indices grouped into the units that move between splits together: one per group
    (article) or passage; with split_by group, groups that share a passage are one unit too, so a
    passage is never in two splits. Records without a group (or context) are units of their own."""
    parent = list(range(len(examples)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    keys = {"group": ("group", "context"), "context": ("context",)}.get(split_by, ())
    first: dict[tuple[str, str], int] = {}
    for index, example in enumerate(examples):
        for key in keys:
            value = getattr(example, key)
            if value:
                other = first.setdefault((key, value), index)
                parent[root(index)] = root(other)
    units: dict[int, list[int]] = {}
    for index in range(len(examples)):
        units.setdefault(root(index), []).append(index)
    return list(units.values())


def _assign(units: list[list[int]], fractions: dict[str, float], seed: int, total: int) -> dict[str, list[int]]:
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    targets = {name: fractions[name] * total for name in SPLITS}
    assigned: dict[str, list[int]] = {name: [] for name in SPLITS}
    for u in order:
        # The split furthest below its target (relative to its size) takes the next unit. All
        # start tied and ties go to train first, so train is never empty when its fraction is > 0.
        open_splits = [name for name in SPLITS if targets[name] > 0]
        name = max(open_splits, key=lambda s: (targets[s] - len(assigned[s])) / targets[s])
        assigned[name].extend(units[u])
    return assigned


def _miss(assigned: dict[str, list[int]], fractions: dict[str, float], total: int) -> float:
    """The worst split's distance from its asked fraction, in tolerances (<= 1: within it); a
    split asked for but left empty misses by more than any other (+ its fraction, to rank)."""
    worst = 0.0
    for name in SPLITS:
        share, fraction = len(assigned[name]) / total, fractions[name]
        tolerance = max(SHARE_TOLERANCE_POINTS, SHARE_TOLERANCE_RELATIVE * fraction)
        worst = max(worst, abs(share - fraction) / tolerance if share or not fraction else 1e6 * (1 + fraction))
    return worst


def _shares(assigned: dict[str, list[int]], total: int) -> str:
    return " / ".join(f"{100 * len(assigned[name]) / total:.1f}%" for name in SPLITS)


def split_examples(examples: list[Example], split: Any, seed: int = 42, split_by: str = "auto") -> SplitResult:
    """Split `examples` by the fractions in `split` (a SplitConfig or a mapping) and `seed`.

    Split sizes aim at the fractions counted in records. Each split keeps the file's order.
    When the fraction for train is positive, train is never left empty. With split_by auto, data
    with groups is split by group unless whole groups miss the fractions (see the module
    docstring) and whole passages come closer; a note says which was used and why.

    Raises:
        DataError: the fractions or split_by are invalid.
    """
    fractions = _fractions(split)
    mode = _resolve_split_by(examples, split_by)
    total = len(examples)
    units = _units(examples, mode)
    assigned = _assign(units, fractions, seed, total)
    notes = []
    if mode == "group" and total and _miss(assigned, fractions, total) > 1:
        asked = " / ".join(f"{100 * fractions[name]:.0f}%" for name in SPLITS)
        missed = (
            f"whole articles ({len(units)}) give train / validation / test {_shares(assigned, total)} "
            f"of the records, {asked} asked (each within max({100 * SHARE_TOLERANCE_POINTS:.0f} points, "
            f"{100 * SHARE_TOLERANCE_RELATIVE:.0f}% of its fraction), never empty)"
        )
        by_passage = _units(examples, "context")
        passage_assigned = _assign(by_passage, fractions, seed, total)
        if split_by == "auto" and _miss(passage_assigned, fractions, total) < _miss(assigned, fractions, total):
            notes.append(
                f"split by passage, not by article: {missed}; whole passages ({len(by_passage)}) give "
                f"{_shares(passage_assigned, total)}"
            )
            mode, units, assigned = "context", by_passage, passage_assigned
        elif split_by == "group":
            notes.append(f"{missed}; split_by: auto (or context) would split by passage instead")

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
