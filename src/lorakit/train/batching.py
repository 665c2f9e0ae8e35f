"""How the Trainer gets its batches: packed micro-batches (prompting/packing.py) or padded examples.

train.packing decides, per model:
- passages / examples pack a causal model's micro-batch into rows (see prompting/packing.py); the
  rows need a model whose forward takes position_ids and an attention that accepts a 4D mask
  (SDPA, eager), not FlashAttention-2's varlen kernels, which take no mask.
- off pads each micro-batch to its longest example.
- auto: passages wherever packing can run, else off. Seq2seq models are never packed: the encoder
  attends in both directions, so a shared passage's encoding depends on what follows it.

A packed dataset's items are whole micro-batches (the Trainer's per-device batch size is then 1),
planned once from the seed, so a resumed run sees the same micro-batches in the same order.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..config import LorakitConfig
from ..errors import ConfigError
from ..prompting.packing import PackedCollator, ShiftedLabelsCollator, packed_tokens, plan_micro_batches
from .loss import unwrap_peft

logger = logging.getLogger("lorakit.train")


class MicroBatchDataset(torch.utils.data.Dataset[list[dict[str, Any]]]):
    """Each item is one planned micro-batch: a list of feature dicts."""

    def __init__(self, features: list[dict[str, Any]], batches: list[list[int]]) -> None:
        self.batches = [[features[i] for i in batch] for batch in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        return self.batches[index]


def why_not_packable(model: torch.nn.Module, task_type: str) -> str | None:
    """None when rows can be packed for this model, else the reason."""
    if task_type != "causal":
        return "a seq2seq model's encoder attends both ways, so examples cannot share its rows"
    base = unwrap_peft(model)
    attention = str(getattr(base.config, "_attn_implementation", None) or "")
    if attention.startswith("flash"):
        return f"attn_implementation={attention} takes no 4D attention mask"
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no position_ids"
    return None


def resolve_packing(config: LorakitConfig, model: torch.nn.Module, task_type: str) -> str:
    """The packing mode this run uses: passages, examples or off.

    Raises:
        ConfigError: train.packing names a mode this model cannot run.
    """
    asked = config.train.packing
    if asked == "off":
        return "off"
    reason = why_not_packable(model, task_type)
    if reason is None:
        return "passages" if asked == "auto" else asked
    if asked == "auto":
        logger.info(f"packing: off ({reason})")
        return "off"
    raise ConfigError(
        f"train.packing={asked} cannot run here: {reason}.",
        hint="set train.packing=auto (packs where it can) or train.packing=off",
    )


@dataclass
class Batching:
    """What the Trainer is given: the datasets, the collator and its per-device batch size."""

    train_dataset: torch.utils.data.Dataset[Any]
    eval_dataset: torch.utils.data.Dataset[Any] | None
    collator: Any
    per_device_batch_size: int
    packed: bool


def build_batching(
    config: LorakitConfig,
    mode: str,
    train_features: list[dict[str, Any]],
    eval_features: list[dict[str, Any]],
    pad_token_id: int,
    task_type: str,
) -> Batching:
    """Datasets and collator for the mode from resolve_packing."""
    from ..prompting.collation import PaddingCollator
    from .arguments import FeatureDataset

    tc, max_length = config.train, config.template.max_length
    if mode == "off":
        causal = task_type == "causal"
        collator = ShiftedLabelsCollator(pad_token_id) if causal else PaddingCollator(pad_token_id, seq2seq=True)
        unpacked_eval = FeatureDataset(eval_features) if eval_features else None
        return Batching(FeatureDataset(train_features), unpacked_eval, collator, tc.micro_batch_size, False)
    share = mode == "passages"
    budget = tc.batch_tokens or tc.micro_batch_size * max_length

    def plan(features: list[dict[str, Any]], seed: int | None) -> list[list[int]]:
        return plan_micro_batches(
            features,
            micro_batch_size=tc.micro_batch_size,
            batch_tokens=budget,
            max_length=max_length,
            share=share,
            seed=seed,
        )

    batches = plan(train_features, tc.seed)
    train_dataset = MicroBatchDataset(train_features, batches)
    eval_dataset = MicroBatchDataset(eval_features, plan(eval_features, None)) if eval_features else None
    unpacked = sum(len(f["input_ids"]) for f in train_features)
    packed = sum(packed_tokens(items, max_length, share) for items in train_dataset.batches)
    logger.info(
        f"packing: {mode}: {len(train_features)} examples in {len(batches)} micro-batches; "
        f"{packed} tokens to compute instead of {unpacked} ({unpacked / max(packed, 1):.2f}x fewer)"
    )
    return Batching(train_dataset, eval_dataset, PackedCollator(pad_token_id, max_length, share), 1, True)
