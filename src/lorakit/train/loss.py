"""Causal LM loss for batches that carry `shift_labels`: logits only where a token is labelled.

In SQuAD-shaped data about 2% of the positions are labelled (the answer); the rest is passage and
question. The model's own loss runs the output projection (hidden -> vocabulary) at every position
and keeps those float32 logits for backward. Here only the hidden states at labelled positions go
through the projection and the cross-entropy, a chunk at a time, each chunk recomputed in backward
instead of kept: the same loss and gradients with "logits + loss" memory near zero.

The collator's batch (see the shared contract in docs/architecture.md):
  input_ids [B, L]; attention_mask [B, L] (1/0) or bool [B, 1, L, L] (True = may attend);
  position_ids [B, L] (packed rows only); shift_labels [B, L] (the target predicted FROM each
  position, -100 = none); labels (the same tensor, so the Trainer counts num_items_in_batch).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger("lorakit.train")

# One chunk's float32 logits stay about this size (341 positions of a 49k vocabulary): small next
# to the activations, yet large enough that the projection runs as a few big matmuls, not many.
LOGIT_CHUNK_BYTES = 64 * 2**20

# Tokens of the first row used by the one-time check that logits == head(decoder(...)).
SELF_CHECK_TOKENS = 16

# Config fields through which a model changes its logits after the projection. The numeric check
# below catches any such change of visible size; these catch one that small random logits would
# hide (a tanh softcap is almost the identity near zero).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

_verdicts: weakref.WeakKeyDictionary[torch.nn.Module, tuple[bool, str]] = weakref.WeakKeyDictionary()


def unwrap_peft(model: torch.nn.Module) -> Any:
    """The transformers model inside a peft model (LoRA layers included), else the model itself.

    Typed Any: its get_decoder/get_output_embeddings are transformers' (nn.Module's __getattr__
    would type them as tensors).
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in: autocast's when it is on, else the input embeddings'."""
    while isinstance(inner := getattr(model, "module", None), torch.nn.Module):  # DistributedDataParallel & co.
        model = inner
    embeddings = unwrap_peft(model).get_input_embeddings()
    device_type = embeddings.weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return embeddings.weight.dtype


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean 4D mask as an additive float one (0 where True, the dtype's min where False).

    Eager attention adds the mask to the scores, so it must be a float; SDPA takes either. Other
    masks (the 2D 1/0 padding mask) are returned as they are.
    """
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
        return attention_mask
    blocked = torch.full(attention_mask.shape, torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return blocked.masked_fill(attention_mask, 0.0)


def model_inputs(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """input_ids, the mask (float when 4D) and position_ids when the batch has them."""
    kwargs: dict[str, Any] = {"input_ids": inputs["input_ids"]}
    if inputs.get("attention_mask") is not None:
        kwargs["attention_mask"] = additive_mask(inputs["attention_mask"], compute_dtype(model))
    if inputs.get("position_ids") is not None:
        kwargs["position_ids"] = inputs["position_ids"]
    return kwargs


def plain_projection(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[bool, str]:
    """Whether the model's logits are head(decoder(x)) and nothing more, with the reason; cached.

    Decided by a one-time check on a few real tokens (dropout off) rather than a list of model
    names: a model that scales, caps or otherwise post-processes its logits (Gemma2's softcap,
    Cohere's logit_scale, Granite's logits_scaling, ...) or lacks the decoder / head accessors
    fails it and keeps its own loss, whatever it is called.
    """
    base = unwrap_peft(model)
    if base in _verdicts:
        return _verdicts[base]
    verdict = _decide(model, base, input_ids)
    _verdicts[base] = verdict
    logger.info(
        "loss: %s (%s)",
        "logits only at labelled positions, chunked" if verdict[0] else "the model's own loss",
        verdict[1],
    )
    return verdict


def _decide(model: torch.nn.Module, base: Any, input_ids: torch.Tensor) -> tuple[bool, str]:
    config = base.config
    if getattr(config, "is_encoder_decoder", False):
        return False, "an encoder-decoder model"
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value is not None and value != 1:
            return False, f"its config sets {name}={value}, so its logits are not a plain projection"
    if not (hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")):
        return False, "the model has no get_decoder/get_output_embeddings"
    ids = input_ids[:1, :SELF_CHECK_TOKENS]
    was_training = model.training
    model.eval()  # dropout off: both passes must see the same network
    try:
        with torch.no_grad():
            own = model(input_ids=ids, use_cache=False).logits
            hidden = base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            mine = base.get_output_embeddings()(hidden)
    except (AttributeError, TypeError, ValueError) as error:
        return False, f"the decoder/head split failed ({type(error).__name__}: {error})"
    finally:
        model.train(was_training)
    if own.shape != mine.shape:
        return False, f"head(decoder(x)) has shape {tuple(mine.shape)}, the model's logits {tuple(own.shape)}"
    # the same kernels on the same inputs: any difference beyond rounding is a post-processing step
    scale = own.float().abs().max().item()
    gap = (own.float() - mine.float()).abs().max().item()
    if gap > 16 * torch.finfo(own.dtype).eps * max(scale, 1.0):
        return False, f"its logits differ from head(decoder(x)) by {gap:.3g} (largest logit {scale:.3g})"
    return True, "its logits are head(decoder(x)), checked on a few tokens"


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # float32 cross-entropy, as transformers' ForCausalLMLoss does
    return F.cross_entropy(logits, targets, reduction="sum")


def labelled_loss(
    model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Summed cross-entropy over labelled positions / num_items_in_batch (else their count).

    Runs the decoder alone, gathers the hidden states where shift_labels != -100 and projects them
    in chunks of LOGIT_CHUNK_BYTES worth of float32 logits, each under activation checkpointing so
    that backward recomputes a chunk's logits instead of keeping them all.
    """
    base = unwrap_peft(model)
    head = base.get_output_embeddings()
    hidden = base.get_decoder()(**model_inputs(model, inputs), use_cache=False).last_hidden_state
    shift_labels = inputs["shift_labels"].to(hidden.device)
    where = shift_labels != -100
    picked, targets = hidden[where], shift_labels[where]
    rows = max(1, LOGIT_CHUNK_BYTES // (4 * head.weight.shape[0]))
    total = hidden.new_zeros((), dtype=torch.float32) + 0.0 * hidden.sum()  # on the graph even with no labels
    for start in range(0, targets.numel(), rows):
        chunk, chunk_targets = picked[start : start + rows], targets[start : start + rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, chunk, chunk_targets, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, chunk, chunk_targets)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / max(targets.numel(), 1)


def model_loss(
    model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
) -> tuple[torch.Tensor, Any]:
    """The model's own loss on the shifted labels (transformers' ForCausalLMLoss takes shift_labels)."""
    kwargs = model_inputs(model, inputs)
    kwargs.update(labels=inputs["shift_labels"], shift_labels=inputs["shift_labels"])
    if num_items_in_batch is not None:
        kwargs["num_items_in_batch"] = num_items_in_batch
    outputs = model(**kwargs)
    return outputs.loss, outputs


def causal_loss(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    num_items_in_batch: torch.Tensor | int | None = None,
    *,
    labelled_logits_only: bool = True,
) -> tuple[torch.Tensor, Any]:
    """(loss, outputs) for a batch with shift_labels: the labelled path when asked and supported.

    The labelled path calls the decoder directly, so `model` must be the model itself (a peft or
    transformers model), not a DistributedDataParallel-style wrapper, whose forward it would skip.
    """
    if labelled_logits_only:
        supported, _ = plain_projection(model, inputs["input_ids"])
        if supported:
            loss = labelled_loss(model, inputs, num_items_in_batch)
            return loss, {"loss": loss}
    return model_loss(model, inputs, num_items_in_batch)
