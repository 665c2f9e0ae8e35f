"""Packed micro-batches for causal models: several examples per row, a shared passage once.

A micro-batch holds `micro_batch_size` encoded examples (so optimizer steps and the learning-rate
schedule are the same as unpacked) and at most `batch_tokens` tokens. Its examples are laid out in
rows of at most `max_length` tokens:

- "examples": each example is a segment of its own; it attends only to itself, with position ids
  starting at 0, exactly as if it were alone in its row.
- "passages": examples whose token ids start the same way (questions on one passage, with the
  template putting the passage first) form a tree: the shared prefix once, then each example's
  remainder as a branch that sees the prefix and itself only, its position ids continuing from the
  end of the prefix. Every branch then computes what the example computes alone (same inputs at
  the same positions, same visible keys), so its logits, loss and gradients are the unpacked ones.

The prefix is the longest common prefix of the members' token ids, shortened so that no prefix
position predicts a labelled token (that target would be trained once instead of once per member)
and every member keeps at least one token of its own.

Why by hand: transformers' DataCollatorWithFlattening packs examples (segment masks, restarting
position ids) but knows no shared prefixes, and it flattens the whole micro-batch into one row,
whose attention then costs the square of the micro-batch's tokens on SDPA and eager; here a row
never exceeds max_length.

The batch keys (the contract with train/loss.py):
  input_ids [B, L]; attention_mask bool [B, 1, L, L] (True = the query row may attend the key
  column; a padding slot attends the row's first token only, so the mask's diagonal marks the real
  tokens); position_ids [B, L]; shift_labels [B, L] (the target predicted FROM each position,
  -100 = none); labels = the same tensor (the Trainer counts num_items_in_batch from it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .encoding import IGNORE

# A shared prefix shorter than this saves too little to give up the randomness of the grouping.
MIN_SHARED_TOKENS = 16

# Neighbours one group may span when grouping: bounds the grouping's cost (n x MAX_GROUP); a
# micro-batch holds far fewer examples anyway.
MAX_GROUP = 64


@dataclass
class Unit:
    """A shared prefix (possibly empty) and the examples' remainders that follow it."""

    prefix: list[int]
    branches: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (ids, shifted targets)

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(ids) for ids, _ in self.branches)


def shifted(labels: Sequence[int]) -> list[int]:
    """The target predicted from each position: the next position's label, none after the last."""
    return [*labels[1:], IGNORE]


def _shareable(feature: dict[str, Any]) -> int:
    """How many leading tokens may be shared: none of their predictions is labelled, one token stays."""
    labels, size = feature["labels"], len(feature["input_ids"])
    first_labelled = next((i for i, label in enumerate(labels) if i > 0 and label != IGNORE), size)
    return max(0, min(first_labelled - 1, size - 1))


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_length(features: Sequence[dict[str, Any]]) -> int:
    """The prefix the features may share (0 for a single feature)."""
    if len(features) < 2:
        return 0
    first = features[0]["input_ids"]
    length = min(_shareable(f) for f in features)
    for other in features[1:]:
        length = min(length, _common(first, other["input_ids"]))
    return length


def group_by_prefix(features: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Indices of features that share a prefix worth sharing (>= MIN_SHARED_TOKENS), in sorted order.

    Sorting the token ids brings examples with a common start together; the sorted list is then
    cut where the tokens saved, sum of (members - 1) x prefix over the groups, are largest (a
    dynamic programme over groups of at most MAX_GROUP neighbours). So the questions on one
    passage form a group, rather than joining the questions on the article's next passage, with
    which they share only the template's header.
    """
    order = sorted(range(len(features)), key=lambda i: features[i]["input_ids"])
    shareable = [_shareable(features[i]) for i in order]
    # common[k]: the prefix sorted items k and k + 1 could share
    common = [
        min(_common(features[a]["input_ids"], features[b]["input_ids"]), shareable[k], shareable[k + 1])
        for k, (a, b) in enumerate(zip(order, order[1:]))
    ]
    best = [0] * (len(order) + 1)  # best[i]: tokens saved by the best cut of the first i items
    start = [0] * (len(order) + 1)  # where the last group of that cut starts
    for end in range(1, len(order) + 1):
        best[end], start[end] = best[end - 1], end - 1  # the item alone
        prefix = None
        for first in range(end - 2, max(-1, end - 1 - MAX_GROUP), -1):
            prefix = common[first] if prefix is None else min(prefix, common[first])
            if prefix < MIN_SHARED_TOKENS:
                break  # a longer group only shares less
            saved = best[first] + (end - 1 - first) * prefix
            if saved > best[end]:
                best[end], start[end] = saved, first
    groups: list[list[int]] = []
    end = len(order)
    while end > 0:
        groups.append(order[start[end] : end])
        end = start[end]
    return groups[::-1]


def build_units(features: Sequence[dict[str, Any]], max_length: int, share: bool) -> list[Unit]:
    """Units of one micro-batch, each at most max_length tokens (a long group is split)."""
    groups = group_by_prefix(features) if share else [[i] for i in range(len(features))]
    units: list[Unit] = []
    for group in groups:
        members = [features[i] for i in group]
        cut = shared_prefix_length(members)
        unit = Unit(list(members[0]["input_ids"][:cut]))
        for member in members:
            ids, targets = member["input_ids"][cut:], shifted(member["labels"])[cut:]
            if unit.branches and len(unit) + len(ids) > max_length:
                units.append(unit)
                unit = Unit(list(unit.prefix))
            unit.branches.append((list(ids), targets))
        units.append(unit)
    return units


def fill_rows(units: list[Unit], max_length: int) -> list[list[Unit]]:
    """First-fit decreasing: the fewest rows of at most max_length tokens, near enough."""
    rows: list[list[Unit]] = []
    room: list[int] = []
    for unit in sorted(units, key=len, reverse=True):
        for r, free in enumerate(room):
            if len(unit) <= free:
                rows[r].append(unit)
                room[r] -= len(unit)
                break
        else:
            rows.append([unit])
            room.append(max_length - len(unit))
    return rows


def packed_tokens(features: Sequence[dict[str, Any]], max_length: int, share: bool) -> int:
    """Tokens the features take once packed (before padding rows to one width)."""
    return sum(len(unit) for unit in build_units(features, max_length, share))


def plan_micro_batches(
    features: Sequence[dict[str, Any]],
    *,
    micro_batch_size: int,
    batch_tokens: int,
    max_length: int,
    share: bool,
    seed: int | None,
) -> list[list[int]]:
    """Feature indices of each micro-batch: at most micro_batch_size examples and batch_tokens tokens.

    With share, examples with a common prefix stay next to each other (their groups in a seeded
    random order, members shuffled within), so a micro-batch holds few distinct passages. With a
    seed None the order is kept (evaluation).
    """
    rng = random.Random(seed)
    groups = group_by_prefix(features) if share else [[i] for i in range(len(features))]
    if seed is not None:
        rng.shuffle(groups)
        for group in groups:
            rng.shuffle(group)
    batches: list[list[int]] = []
    current: list[int] = []
    for index in (i for group in groups for i in group):
        trial = [*current, index]
        full = len(current) >= micro_batch_size
        if current and (full or packed_tokens([features[i] for i in trial], max_length, share) > batch_tokens):
            batches.append(current)
            trial = [index]
        current = trial
    if current:
        batches.append(current)
    return batches


@dataclass
class PackedCollator:
    """A micro-batch (a list of encoded features) -> the packed tensors described above."""

    pad_token_id: int
    max_length: int
    share: bool

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        import torch

        # the Trainer hands over a list of dataset items; each packed item is a whole micro-batch
        features = [f for item in items for f in (item if isinstance(item, list) else [item])]
        rows = fill_rows(build_units(features, self.max_length, self.share), self.max_length)
        width = max(sum(len(unit) for unit in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
        for r, row in enumerate(rows):
            at = 0
            for unit in row:
                start, size = at, len(unit.prefix)
                ids[r, start : start + size] = torch.tensor(unit.prefix, dtype=torch.long)
                positions[r, start : start + size] = torch.arange(size)
                mask[r, 0, start : start + size, start : start + size] = _causal(size)
                at += size
                for branch_ids, branch_targets in unit.branches:
                    n = len(branch_ids)
                    ids[r, at : at + n] = torch.tensor(branch_ids, dtype=torch.long)
                    targets[r, at : at + n] = torch.tensor(branch_targets, dtype=torch.long)
                    positions[r, at : at + n] = torch.arange(size, size + n)
                    mask[r, 0, at : at + n, start : start + size] = True  # the shared prefix
                    mask[r, 0, at : at + n, at : at + n] = _causal(n)
                    at += n
            mask[r, 0, at:, 0] = True  # padding attends one real key: no row of the softmax is empty
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "shift_labels": targets,
            "labels": targets,
        }


def _causal(n: int) -> Any:
    import torch

    return torch.ones((n, n), dtype=torch.bool).tril()


class ShiftedLabelsCollator:
    """Unpacked causal batches with shift_labels added (right padding), so the loss can skip
    unlabelled positions; `labels` is the same tensor."""

    def __init__(self, pad_token_id: int):
        from .collation import PaddingCollator

        self.pad = PaddingCollator(pad_token_id)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.pad(features)
        labels = batch["labels"]
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
        batch["shift_labels"] = batch["labels"] = targets
        return batch
