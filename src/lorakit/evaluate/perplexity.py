"""Perplexity of the reference answers under a model (prompt tokens masked)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..inference.decoding import _as_ids, _batch_tensors, _pad_id

if TYPE_CHECKING:  # annotations only, no import cost
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def reference_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | list[int]],
    answers: list[str],
    *,
    task_type: str = "causal",
    batch_size: int = 16,
) -> float:
    """Perplexity of the reference answers given their prompts: only answer tokens + EOS count."""
    if len(prompts) != len(answers):
        raise ValueError(f"reference_perplexity: {len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        return float("nan")
    device = next(model.parameters()).device
    pad_id = _pad_id(tokenizer, model)
    eos = tokenizer.eos_token_id
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), max(1, batch_size)):
                batch_prompts = [_as_ids(tokenizer, p, task_type) for p in prompts[start : start + batch_size]]
                batch_answers = [
                    list(tokenizer(a, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
                    for a in answers[start : start + batch_size]
                ]
                nll, count = _answer_nll(model, batch_prompts, batch_answers, task_type, pad_id, device)
                total_nll += nll
                total_tokens += count
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")


def _answer_nll(model, prompts, answers, task_type, pad_id, device) -> tuple[float, int]:
    if task_type == "seq2seq":
        input_ids, mask = _batch_tensors(prompts, pad_id, left=False, device=device)
        labels, _ = _batch_tensors(answers, -100, left=False, device=device)
        logits = model(input_ids=input_ids, attention_mask=mask, labels=labels).logits
        targets = labels
    else:
        rows = [p + a for p, a in zip(prompts, answers)]
        label_rows = [[-100] * len(p) + a for p, a in zip(prompts, answers)]
        input_ids, mask = _batch_tensors(rows, pad_id, left=False, device=device)
        labels, _ = _batch_tensors(label_rows, -100, left=False, device=device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        targets = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(losses), int((targets != -100).sum())
