"""Perplexity of the reference answers with a passage shared by several questions encoded once.

The same number as perplexity.reference_perplexity (up to float noise): prompts that start alike
are grouped as for generation (inference.prefix_cache), each batch runs its distinct prefixes
once, then every row's own suffix and answer on a copy of that cache, and the output projection
runs only over the answer positions. Seq2seq models, models whose cache cannot be copied, and
prompts that share no long start take reference_perplexity's way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..inference.decoding import _as_ids, _pad_id
from ..inference.prefix_cache import (
    can_share_prefixes,
    encode_prefixes,
    forward_parameters,
    group_by_prefix,
    prefix_batches,
)
from .perplexity import _answer_nll

if TYPE_CHECKING:  # annotations only, no import cost
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _tail_nll(
    model: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor, cache: Any, answers: list[list[int]]
):
    """NLL of each row's answer, the last len(answer) tokens of its (left-padded) row."""
    start = cache.get_seq_length()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
    width = max(len(a) for a in answers)
    # the logits at a position predict the next token: the answer's come from the width + 1 last positions
    logits = model(
        input_ids=input_ids[:, start:],
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=width + 1,
    ).logits[:, :-1]
    targets = input_ids[:, -width:].clone()
    for row, answer in enumerate(answers):
        targets[row, : width - len(answer)] = -100
    losses = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(losses), int((targets != -100).sum())


def reference_perplexity_shared(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | list[int]],
    answers: list[str],
    *,
    task_type: str = "causal",
    batch_size: int = 16,
) -> float:
    """Perplexity of the reference answers given their prompts: only answer tokens + EOS count
    (as reference_perplexity), each shared prompt start encoded once per batch."""
    if len(prompts) != len(answers):
        raise ValueError(f"reference_perplexity: {len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        return float("nan")
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer, model)
    eos = tokenizer.eos_token_id
    encoded = [_as_ids(tokenizer, p, task_type) for p in prompts]
    targets = [
        list(tokenizer(a, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else []) for a in answers
    ]
    shared = []
    if task_type != "seq2seq" and can_share_prefixes(model) and "logits_to_keep" in forward_parameters(model):
        shared = [g for g in group_by_prefix(encoded) if len(g.members) > 1]
    grouped = {i for g in shared for i in g.members}
    plain = [i for i in range(len(prompts)) if i not in grouped]
    rows = [p + a for p, a in zip(encoded, targets)]
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = prefix_batches(shared, batch_size)
            for n, batch in enumerate(batches):
                prepared = encode_prefixes(model, rows, batch, pad_id, device, 0)
                if prepared is None:  # this model's cache cannot be shared: the plain way for these rows
                    plain += [i for b in batches[n:] for i in b.rows]
                    break
                nll, count = _tail_nll(model, *prepared, [targets[i] for i in batch.rows])
                total_nll, total_tokens = total_nll + nll, total_tokens + count
            for start in range(0, len(plain), max(1, batch_size)):
                chunk = plain[start : start + batch_size]
                nll, count = _answer_nll(
                    model, [encoded[i] for i in chunk], [targets[i] for i in chunk], task_type, pad_id, device
                )
                total_nll, total_tokens = total_nll + nll, total_tokens + count
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")
