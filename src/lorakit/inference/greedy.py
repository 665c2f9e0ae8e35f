"""Greedy decoding of a causal batch that stops computing a row once the row has finished.

transformers' generate keeps every row of a batch in every decoding step until the last row
ends: a row that emitted EOS is fed padding and costs a full step. In evaluation most answers
stop after a few tokens while one row of the batch may run to max_new_tokens, so most of the
decoding work goes to rows already done. generate has no option to drop them, so this loop is
written by hand: the same greedy steps (prefill the uncached prompt part, then one token at a
time with the KV cache), with finished rows removed from the batch and the cache once enough of
them have finished that the removal (a copy of the cache) pays for itself.

Used for greedy causal decoding whose generation config adds nothing to the scores (no
repetition penalty, no forced or suppressed tokens); everything else goes through generate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .prefix_cache import forward_parameters, preallocate
from .shared_attention import SharedPrefix, shared_attention

if TYPE_CHECKING:  # annotations only
    from transformers import GenerationConfig, LogitsProcessor, PreTrainedModel

# drop finished rows once at most this share of the batch is still running: each drop copies the
# live rows' cache, so dropping at every finish would cost more than it saves on a long cache
COMPACT_WHEN_LIVE_AT_MOST = 0.75


def plain_greedy(config: GenerationConfig) -> bool:
    """Whether generate, with this config, would pick the argmax of the model's own scores."""
    untouched = (
        not config.do_sample
        and (config.num_beams or 1) == 1
        and config.repetition_penalty in (None, 1.0)
        and not config.no_repeat_ngram_size
        and not config.bad_words_ids
        and not config.suppress_tokens
        and not config.begin_suppress_tokens
        and config.forced_bos_token_id is None
        and config.forced_eos_token_id is None
        and not config.sequence_bias
        and not config.min_length
        and not config.min_new_tokens
    )
    return bool(untouched)


def greedy_decode(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    past: Any = None,
    processors: Sequence[LogitsProcessor] = (),
    row_done: Callable[[int, list[int]], bool] | None = None,
    shared: SharedPrefix | None = None,
) -> list[list[int]]:
    """The new tokens of each row of a left-padded batch, greedy, each row ending at EOS (kept),
    at max_new_tokens, or when row_done(row, tokens so far) says so.

    past: a cache already holding the first tokens of every row (inference.prefix_cache); only the
    rest of input_ids is run through the model. processors: logits processors called as generate
    calls them (ids so far, scores) on the rows still in the batch; one with a `keep_rows(indices)`
    method is told which rows remain each time finished rows are dropped.
    shared: the rows' passages, encoded once (prefix_cache.encode_shared_prefixes): input_ids hold
    only each row's own tokens, which come after its passage, and attention reads each passage
    once per group of rows (inference.shared_attention).
    """
    if shared is None:
        return _decode(model, input_ids, attention_mask, max_new_tokens, eos_ids, pad_id, past, processors, row_done)
    with shared_attention(model):
        return _decode(
            model, input_ids, attention_mask, max_new_tokens, eos_ids, pad_id, past, processors, row_done, shared
        )


def _decode(
    model, input_ids, attention_mask, max_new_tokens, eos_ids, pad_id, past, processors, row_done, shared=None
) -> list[list[int]]:
    device = input_ids.device
    n = input_ids.shape[0]
    cached = past.get_seq_length() if past is not None else 0
    offsets = shared.position_offsets(device) if shared is not None else torch.zeros(n, dtype=torch.long, device=device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0) + offsets[:, None]
    extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}
    if shared is not None:
        logits, latest_cache = _prefill_by_length(model, input_ids, attention_mask, positions, shared, extra)
    else:
        out = model(
            input_ids=input_ids[:, cached:],
            attention_mask=attention_mask,
            position_ids=positions[:, cached:],
            past_key_values=past,
            use_cache=True,
            **extra,
        )
        logits, latest_cache = out.logits[:, -1, :], out.past_key_values
    cache = preallocate(latest_cache, input_ids.shape[1] + max_new_tokens)
    ids, mask = input_ids, attention_mask
    next_position = attention_mask.sum(-1) + offsets
    rows = list(range(n))  # batch row -> the caller's row
    running = torch.ones(n, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(n)]
    eos = torch.tensor(sorted(eos_ids), device=device) if eos_ids else None
    for step in range(max_new_tokens):
        scores = logits.float()
        for processor in processors:
            scores = processor(ids, scores)
        tokens = scores.argmax(-1)
        tokens = torch.where(running, tokens, torch.full_like(tokens, pad_id))
        for batch_row, token in enumerate(tokens.tolist()):
            if running[batch_row]:
                generated[rows[batch_row]].append(token)
        finished = torch.isin(tokens, eos) if eos is not None else torch.zeros_like(running)
        if row_done is not None:
            for batch_row in running.nonzero().flatten().tolist():
                if not finished[batch_row] and row_done(rows[batch_row], generated[rows[batch_row]]):
                    finished[batch_row] = True
        running = running & ~finished
        live = int(running.sum())
        if live == 0 or step == max_new_tokens - 1:
            break
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        mask = torch.cat([mask, running[:, None].to(mask.dtype)], dim=1)
        if live <= COMPACT_WHEN_LIVE_AT_MOST * len(rows) and cache is not None:
            keep = running.nonzero().flatten()
            cache.batch_select_indices(keep)
            ids, mask, tokens, next_position = ids[keep], mask[keep], tokens[keep], next_position[keep]
            rows = [rows[i] for i in keep.tolist()]
            running = running[keep]
            if shared is not None:
                shared.keep_rows(keep.tolist())
            for processor in processors:
                if hasattr(processor, "keep_rows"):
                    processor.keep_rows(keep.tolist())
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=next_position[:, None],
            past_key_values=cache if cache is not None else latest_cache,
            use_cache=True,
            **({"shared_prefix": shared} if shared is not None else {}),
        )
        next_position = next_position + 1
        logits, latest_cache = out.logits[:, -1, :], out.past_key_values
    return generated


# a forward pass costs about this many prompt positions beyond its positions (weights read once
# more, per-layer overhead): a length bucket of its own must save more padding than that
POSITIONS_PER_FORWARD = 48


def length_buckets(lengths: Sequence[int], overhead: int | None = None) -> list[list[int]]:
    """Rows (indices into lengths) in buckets of similar length, each bucket in row order, that
    minimise the positions computed, padding included, plus `overhead` per bucket: rows sorted by
    length, cut where a cut saves more padding than a forward pass costs (dynamic programming)."""
    overhead = POSITIONS_PER_FORWARD if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0] * (len(order) + 1)  # best[k]: cost of the k shortest rows
    cut = [0] * (len(order) + 1)
    for k in range(1, len(order) + 1):
        # the last bucket holds sorted rows j..k-1, padded to the longest, lengths[order[k-1]]
        best[k], cut[k] = min((best[j] + overhead + (k - j) * lengths[order[k - 1]], j) for j in range(k))
    buckets, k = [], len(order)
    while k:
        buckets.append(sorted(order[cut[k] : k]))
        k = cut[k]
    return buckets[::-1]


def _prefill_by_length(model, input_ids, mask, positions, shared: SharedPrefix, extra) -> tuple[torch.Tensor, Any]:
    """The rows' own tokens (their passages are in `shared`) through the model in buckets of similar
    length, so a short question is not padded to the longest one of the batch (on SQuAD a quarter
    of the suffix positions were padding); the buckets' caches joined, left-padded, in row order.
    Rows attend only to their passage and themselves, so a row's logits do not depend on its bucket."""
    lengths = mask.sum(-1).tolist()
    buckets = length_buckets(lengths)
    if len(buckets) == 1:
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **(extra | {"shared_prefix": shared}),
        )
        return out.logits[:, -1, :], out.past_key_values
    width = input_ids.shape[1]
    logits: torch.Tensor | None = None
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    cache: Any = None
    for rows in buckets:
        index = torch.tensor(rows, device=input_ids.device)
        start = width - max(lengths[i] for i in rows)
        part = SharedPrefix(shared.keys, shared.values, shared.lengths, [shared.row_group[i] for i in rows])
        out = model(
            input_ids=input_ids[index, start:],
            attention_mask=mask[index, start:],
            position_ids=positions[index, start:],
            use_cache=True,
            **(extra | {"shared_prefix": part}),
        )
        last = out.logits[:, -1, :]
        if logits is None:
            logits = last.new_empty((input_ids.shape[0], last.shape[-1]))
        logits[index] = last
        cache = out.past_key_values
        for n, layer in enumerate(cache.layers):
            if n == len(keys):  # room for every row at the batch's width; padding slots stay zero (masked)
                keys.append(
                    layer.keys.new_zeros((input_ids.shape[0], *layer.keys.shape[1:2], width, layer.keys.shape[3]))
                )
                values.append(
                    layer.values.new_zeros((input_ids.shape[0], *layer.values.shape[1:2], width, layer.values.shape[3]))
                )
            keys[n][index, :, start:] = layer.keys
            values[n][index, :, start:] = layer.values
    for layer, k, v in zip(cache.layers, keys, values):  # the last bucket's cache, holding every row
        layer.keys, layer.values = k, v
    assert logits is not None
    return logits, cache
