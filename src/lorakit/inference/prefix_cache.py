"""A prefix shared by several prompts, encoded once, its KV cache reused by every prompt that has it.

SQuAD-style evaluation asks several questions about one passage, and the templates put the passage
first, so those prompts start with the same long run of token ids. generate_batched groups such
prompts (group_by_prefix), runs the distinct prefixes of a batch through the model once
(encode_prefixes), copies each prefix's cache to the rows of its group, and lets generate encode
only each row's own suffix (the question) before decoding.

One batch row, as generate sees it (several groups may share a batch):

    [pad ... the prefix of the row's group | pad ... the row's own suffix]

Padding sits left of each part, with attention mask 0. generate derives position ids from the
mask's running count, so every real token gets the position it has when its prompt is generated
alone, and attends to exactly the tokens it attends to then: the same answers, up to float noise.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .shared_attention import SharedPrefix, unwrapped_model

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedModel

# a shorter common start saves too little prefill to be worth its own forward pass
MIN_SHARED_TOKENS = 16
# rows of one batch when passages are read once: bounds the logits (rows x vocabulary) and the
# per-step bookkeeping; the cache room (prefix_batches) is usually the tighter bound
MAX_SHARED_ROWS = 256


@dataclass
class PrefixGroup:
    """Prompts (indices into the caller's list) whose first `length` token ids are the same."""

    members: list[int]
    length: int


@dataclass
class PrefixBatch:
    """One generate call: `rows` (prompt indices) and, per row, the index of its group in `groups`."""

    rows: list[int]
    groups: list[PrefixGroup]
    row_group: list[int]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def group_by_prefix(encoded: Sequence[Sequence[int]], min_shared: int = MIN_SHARED_TOKENS) -> list[PrefixGroup]:
    """Groups of prompts that share at least min_shared leading tokens; every other prompt alone.

    Sorted by token ids, prompts with a common prefix are neighbours. Walking that order, a prompt
    joins the open group unless that would cost more shared tokens than it saves: it shares twice
    as much with the next prompt (a new passage starts with it), or it would cut the group's
    shared prefix below half (a passage's questions would lose their passage). A group's prefix
    stops at least one token short of its shortest member, so every row has a suffix to encode.
    """
    order = sorted(range(len(encoded)), key=lambda i: list(encoded[i]))
    adjacent = [common_prefix_length(encoded[a], encoded[b]) for a, b in zip(order, order[1:])]
    groups: list[PrefixGroup] = []
    members: list[int] = []
    shared = 0
    for k, index in enumerate(order):
        if members:
            common = min(shared, adjacent[k - 1])
            ahead = adjacent[k] if k < len(adjacent) else 0
            if common >= min_shared and 2 * common >= ahead and (len(members) == 1 or 2 * common >= shared):
                members.append(index)
                shared = common
                continue
            groups.append(PrefixGroup(members, shared))
        members, shared = [index], len(encoded[index])
    if members:
        groups.append(PrefixGroup(members, shared))
    out = []
    for group in groups:
        length = min(group.length, min(len(encoded[i]) for i in group.members) - 1)
        if len(group.members) > 1 and length >= min_shared:
            out.append(PrefixGroup(group.members, length))
        else:  # alone, or too little left in common: each prompt its own group (no prefix)
            out.extend(PrefixGroup([i], 0) for i in group.members)
    return out


def prefix_batches(
    groups: Sequence[PrefixGroup],
    batch_size: int,
    *,
    lengths: Sequence[int] | None = None,
    new_tokens: int = 0,
) -> list[PrefixBatch]:
    """Rows in batches, longest prefix first; a group may span two batches (its prefix is then
    encoded once in each).

    Without `lengths`: batch_size rows per batch (every row holds its own copy of its prefix).
    With `lengths` (each prompt's token count; rows that read their group's prefix once, see
    shared_attention): a batch holds as many rows as fit in the cache room of batch_size average
    prompts, each with new_tokens to generate, counting each prefix once and each row's own
    tokens; at most MAX_SHARED_ROWS. So a batch never holds more cache than the batch_size the
    caller chose for its memory, and on passage-heavy data many more questions share each step.
    """
    rows = [(i, group) for group in sorted(groups, key=lambda g: -g.length) for i in group.members]
    pieces: list[list[tuple[int, PrefixGroup]]] = []
    if lengths is None:
        size = max(1, batch_size)
        pieces = [rows[start : start + size] for start in range(0, len(rows), size)]
    else:
        room = max(1, batch_size) * (sum(lengths[i] for i, _ in rows) / max(1, len(rows)) + new_tokens)
        piece: list[tuple[int, PrefixGroup]] = []
        used = 0.0
        for i, group in rows:
            cost = lengths[i] - group.length + new_tokens
            if not piece or piece[-1][1] is not group:  # a group's rows are neighbours: its first row here
                cost += group.length
            if piece and (used + cost > room or len(piece) == MAX_SHARED_ROWS):
                pieces.append(piece)
                piece, used = [], 0.0
                cost = lengths[i] + new_tokens  # the prefix counts again in the new batch
            piece.append((i, group))
            used += cost
        if piece:
            pieces.append(piece)
    batches = []
    for piece in pieces:
        distinct: list[PrefixGroup] = []
        for _, group in piece:
            if not any(group is g for g in distinct):
                distinct.append(group)
        row_group = [next(n for n, g in enumerate(distinct) if g is group) for _, group in piece]
        batches.append(PrefixBatch([i for i, _ in piece], distinct, row_group))
    return batches


def forward_parameters(model: PreTrainedModel) -> set[str]:
    """The keyword arguments the model's own forward takes (through a peft wrapper)."""
    return set(inspect.signature(unwrapped_model(model).forward).parameters)


def can_share_prefixes(model: PreTrainedModel) -> bool:
    """Decoder-only models that take position ids (else padding inside a row would shift positions)
    and let generate use the cache it is given (no cache_implementation of their own)."""
    inner = unwrapped_model(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(getattr(inner, "generation_config", None), "cache_implementation", None) is not None:
        return False
    return "position_ids" in forward_parameters(model)


@functools.cache
def _preallocated_layer_class() -> Any:
    """Made once, on first use: importing transformers' cache module at import time would cost every import."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A DynamicLayer whose keys and values are views of buffers with room for the tokens to
        come, written in place; DynamicLayer concatenates, copying the whole cache at every
        decoding step (40% of a batch-32 step of SmolLM2 on CPU). Past the room it concatenates."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
            super().__init__()
            self.lazy_initialization(keys, values)
            self.key_buffer: torch.Tensor | None = keys.new_empty((*keys.shape[:2], capacity, keys.shape[3]))
            self.value_buffer = values.new_empty((*values.shape[:2], capacity, values.shape[3]))
            self.length = 0
            self.update(keys, values)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            end = self.length + key_states.shape[-2]
            if self.key_buffer is None or end > self.key_buffer.shape[-2]:
                self.key_buffer = None  # from now on the plain way
                return super().update(key_states, value_states, *args, **kwargs)
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep only these rows (finished rows leaving the batch), room included."""
            if self.key_buffer is None:
                return super().batch_select_indices(indices)
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]

    return PreallocatedLayer


def preallocate(cache: Any, capacity: int) -> Any:
    """The cache with each plain layer turned into one with room for `capacity` tokens in all, or
    None when it is not a plain per-token cache (sliding windows, recurrent state) and must be left
    to the model."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    preallocated = _preallocated_layer_class()
    layers: list[Any] = list(cache.layers) if isinstance(cache, DynamicCache) else []
    if not layers or any(type(layer) not in (DynamicLayer, preallocated) for layer in layers):
        return None
    cache.layers = [
        layer if type(layer) is preallocated else preallocated(layer.keys, layer.values, capacity) for layer in layers
    ]
    return cache


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + list(r) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def _encode_distinct_prefixes(
    model: PreTrainedModel, encoded: Sequence[Sequence[int]], batch: PrefixBatch, pad_id: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor, torch.Tensor] | None:
    """Each distinct prefix of the batch through the model once: (prefix ids, prefix mask, cache,
    suffix ids, suffix mask), all left-padded; None when the cache is not a plain per-token one
    (sliding windows, recurrent state), which cannot be shared across rows."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    prefixes = [encoded[g.members[0]][: g.length] for g in batch.groups]
    prefix_ids, prefix_mask = _left_pad(prefixes, pad_id, device)
    # a padded slot's position does not matter (nothing attends to it); real tokens count from 0
    positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}
    out = model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions, use_cache=True, **extra)
    cache = out.past_key_values
    layers: list[Any] = list(cache.layers) if isinstance(cache, DynamicCache) else []
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    suffixes = [encoded[i][batch.groups[g].length :] for i, g in zip(batch.rows, batch.row_group)]
    suffix_ids, suffix_mask = _left_pad(suffixes, pad_id, device)
    return prefix_ids, prefix_mask, cache, suffix_ids, suffix_mask


def encode_prefixes(
    model: PreTrainedModel,
    encoded: Sequence[Sequence[int]],
    batch: PrefixBatch,
    pad_id: int,
    device: Any,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
    """(input_ids, attention_mask, past_key_values) for generate: each distinct prefix of the batch
    run through the model once, its cache copied to its group's rows, with room for the suffixes
    and max_new_tokens more.

    None when the model's cache is not a plain per-token one (sliding windows, recurrent state):
    such a cache cannot be copied across rows this way, so the caller generates those rows plainly.
    """
    encoded_prefixes = _encode_distinct_prefixes(model, encoded, batch, pad_id, device)
    if encoded_prefixes is None:
        return None
    prefix_ids, prefix_mask, cache, suffix_ids, suffix_mask = encoded_prefixes
    select = torch.tensor(batch.row_group, device=device)
    cache.batch_select_indices(select)  # each row gets its group's prefix
    cache = preallocate(cache, prefix_ids.shape[1] + suffix_ids.shape[1] + max_new_tokens)
    input_ids = torch.cat([prefix_ids[select], suffix_ids], dim=1)
    mask = torch.cat([prefix_mask[select], suffix_mask], dim=1)
    return input_ids, mask, cache


def encode_shared_prefixes(
    model: PreTrainedModel, encoded: Sequence[Sequence[int]], batch: PrefixBatch, pad_id: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor, SharedPrefix] | None:
    """(suffix ids, suffix mask, the passages' cache) for greedy_decode with shared-prefix attention:
    each distinct prefix encoded once and kept once (not copied to its rows), so the rows' own
    caches start empty and hold only their suffix and answer. None as for encode_prefixes."""
    encoded_prefixes = _encode_distinct_prefixes(model, encoded, batch, pad_id, device)
    if encoded_prefixes is None:
        return None
    _, _, cache, suffix_ids, suffix_mask = encoded_prefixes
    shared = SharedPrefix(
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        lengths=[g.length for g in batch.groups],
        row_group=list(batch.row_group),
    )
    return suffix_ids, suffix_mask, shared
