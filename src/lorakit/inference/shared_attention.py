"""Attention that reads a shared passage's keys and values once per group of rows (cascade attention).

prefix_cache.py encodes a passage once for all the questions asked about it. Copying its cache to
every row still makes each decoding step read the passage's keys and values once per row: on a
CPU that is about 2 ms per row and step for SmolLM2, 40% of a row's cost. Here the passage's cache
stays one copy per group, and each row's cache holds only its own tokens (question and answer).
A query's attention is split in two softmax parts, combined exactly by their log-sum-exp:

    part 1: the queries of a group's rows against the group's passage (one matmul per group)
    part 2: each row's queries against its own tokens (causal, padding masked)

transformers has no such attention, so it is written here and registered as an attention
implementation: the model's own code (projections, rotary positions, cache updates) runs as
usual and calls it in place of SDPA. The forward passes that use it carry a `shared_prefix`
keyword argument, which the model hands down to its attention; any other call falls back to SDPA.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedModel

ATTENTION_NAME = "lorakit_shared_prefix"

# model types whose attention is plain scaled dot-product over the cache (no soft-capping, sinks,
# ALiBi or sliding windows) and goes through transformers' attention interface; the others keep
# a copy of the passage per row (prefix_cache.encode_prefixes), which is exact for every model
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "olmo", "olmo2"}


@dataclass
class SharedPrefix:
    """The passages of a batch, encoded once: per layer, keys and values [groups, kv_heads, width,
    head_dim], left-padded (group g's tokens are its last `lengths[g]` positions), and the group of
    each batch row. Rows of one group are neighbours (prefix_cache.prefix_batches orders them so)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: list[int]
    row_group: list[int]
    spans: list[tuple[int, int, int]] = field(init=False)  # (group, first row, end row)

    def __post_init__(self) -> None:
        self._index_spans()

    def _index_spans(self) -> None:
        spans: list[tuple[int, int, int]] = []
        for row, group in enumerate(self.row_group):
            if spans and spans[-1][0] == group:
                spans[-1] = (group, spans[-1][1], row + 1)
            elif any(g == group for g, _, _ in spans):
                raise ValueError("the rows of a shared prefix must be neighbours")
            else:
                spans.append((group, row, row + 1))
        self.spans = spans

    def position_offsets(self, device: Any) -> torch.Tensor:
        """Each row's first own token comes right after its group's passage."""
        return torch.tensor([self.lengths[g] for g in self.row_group], device=device)

    def keep_rows(self, indices: Sequence[int]) -> None:
        """Finished rows left the batch (inference.greedy): the remaining rows, in order."""
        self.row_group = [self.row_group[i] for i in indices]
        self._index_spans()


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    shared_prefix: SharedPrefix | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of query [rows, heads, q_len, dim] over each row's passage and its own cache
    key/value [rows, kv_heads, kv_len, dim]; attention_mask is SDPA's boolean mask for the own
    part (True = attend) or None (plain causal). Returns [rows, q_len, heads, dim], as SDPA does."""
    if shared_prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if kwargs.get("sliding_window") is not None:  # supports_shared_attention admits no such model
        raise ValueError("shared-prefix attention has no sliding window")
    rows, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else dim**-0.5
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    # grouped-query attention without repeating keys: the query heads that share a kv head are
    # stacked along the query axis, (rep, position) in that order
    grouped = query.reshape(rows, kv_heads, (heads // kv_heads) * q_len, dim)

    # part 2, every row at once: own tokens, causal and padding-masked
    own = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale
    own = own.view(rows, kv_heads, heads // kv_heads, q_len, kv_len)
    if attention_mask is None:  # SDPA's mask left out: causal over the last q_len keys
        position = torch.arange(kv_len, device=query.device)
        attention_mask = position[None, :] <= position[-q_len:, None]
    if attention_mask.dtype != torch.bool:  # an additive float mask
        own = own + attention_mask.float().view(*attention_mask.shape[:-2], 1, q_len, kv_len)
    else:
        own = own.masked_fill(~attention_mask.view(*attention_mask.shape[:-2], 1, q_len, kv_len), float("-inf"))
    own = own.view(rows, kv_heads, -1, kv_len)
    # a left-padding query sees none of its own keys: a max of 0 keeps its weights 0, not NaN
    # (SDPA would give NaN there, and a NaN value times a weight of 0 is still NaN in later layers)
    own_max = own.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    own_weights = torch.exp(own - own_max)
    own_sum = own_weights.sum(-1, keepdim=True)
    own_out = torch.matmul(own_weights.to(value.dtype), value).float()

    # part 1, one matmul per group: its rows' queries against its passage
    pre_max = torch.full_like(own_max, float("-inf"))
    pre_sum = torch.zeros_like(own_sum)
    pre_out = torch.zeros_like(own_out)
    keys, values = shared_prefix.keys[layer], shared_prefix.values[layer]
    for group, start, end in shared_prefix.spans:
        length = shared_prefix.lengths[group]
        passage_k = keys[group, :, keys.shape[2] - length :]  # [kv_heads, length, dim]
        passage_v = values[group, :, values.shape[2] - length :]
        n = end - start
        # [kv_heads, n * rep * q_len, dim]: the group's queries side by side
        q = grouped[start:end].transpose(0, 1).reshape(kv_heads, -1, dim)
        scores = torch.matmul(q, passage_k.transpose(-1, -2)).float() * scale
        top = scores.amax(-1, keepdim=True)
        weights = torch.exp(scores - top)
        out = torch.matmul(weights.to(passage_v.dtype), passage_v).float()
        pre_max[start:end] = top.view(kv_heads, n, -1, 1).transpose(0, 1)
        pre_sum[start:end] = weights.sum(-1, keepdim=True).view(kv_heads, n, -1, 1).transpose(0, 1)
        pre_out[start:end] = out.view(kv_heads, n, -1, dim).transpose(0, 1)

    # the two parts as one softmax: rescale each by exp(its max - the joint max)
    joint = torch.maximum(pre_max, own_max)
    pre_scale, own_scale = torch.exp(pre_max - joint), torch.exp(own_max - joint)
    total = pre_out * pre_scale + own_out * own_scale
    total = total / (pre_sum * pre_scale + own_sum * own_scale)
    total = total.to(query.dtype).view(rows, heads, q_len, dim)
    return total.transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> str:
    """Registered once, on first use (importing transformers' interfaces costs every import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
    # the model builds SDPA's mask for the rows' own tokens, which is what part 2 needs
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def unwrapped_model(model: PreTrainedModel) -> Any:
    """The transformers model under a peft wrapper (whose forward passes keyword arguments on)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports_shared_attention(model: PreTrainedModel) -> bool:
    inner = unwrapped_model(model)
    config = getattr(inner, "config", None)
    return (
        config is not None
        and getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES
        and bool(getattr(inner, "_supports_attention_backend", False))
        and not getattr(config, "is_encoder_decoder", False)
    )


@contextlib.contextmanager
def shared_attention(model: PreTrainedModel) -> Iterator[None]:
    """The model's attention is shared_prefix_attention inside the block, its own again after."""
    config = unwrapped_model(model).config
    before = config._attn_implementation
    config._attn_implementation = _register()
    try:
        yield
    finally:
        config._attn_implementation = before
