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
) -> list[list[int]]:
    """The new tokens of each row of a left-padded batch, greedy, each row ending at EOS (kept),
    at max_new_tokens, or when row_done(row, tokens so far) says so.

    past: a cache already holding the first tokens of every row (inference.prefix_cache); only the
    rest of input_ids is run through the model. processors: logits processors called as generate
    calls them (ids so far, scores) on the rows still in the batch; one with a `keep_rows(indices)`
    method is told which rows remain each time finished rows are dropped.
    """
    device = input_ids.device
    n = input_ids.shape[0]
    cached = past.get_seq_length() if past is not None else 0
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}
    out = model(
        input_ids=input_ids[:, cached:],
        attention_mask=attention_mask,
        position_ids=positions[:, cached:],
        past_key_values=past,
        use_cache=True,
        **extra,
    )
    cache = preallocate(out.past_key_values, input_ids.shape[1] + max_new_tokens)
    logits = out.logits[:, -1, :]
    ids, mask = input_ids, attention_mask
    next_position = attention_mask.sum(-1)
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
            for processor in processors:
                if hasattr(processor, "keep_rows"):
                    processor.keep_rows(keep.tolist())
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=next_position[:, None],
            past_key_values=cache if cache is not None else out.past_key_values,
            use_cache=True,
        )
        next_position = next_position + 1
        logits = out.logits[:, -1, :]
    return generated
