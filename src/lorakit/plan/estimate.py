"""Estimates from a config: the data's token lengths, and memory and time per step for a device."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..config import LorakitConfig
from ..errors import ModelError
from .devices import GpuSpec, gpu_spec, precision_bytes, step_time
from .memory import (
    MemoryEstimate,
    TimeEstimate,
    estimate_step_memory,
    lora_modules,
    lora_param_count,
)
from .shape import ModelShape


@dataclass
class DataLengths:
    lengths: list[int]  # tokens per training example (causal: prompt + answer; seq2seq: encoder input)
    target_lengths: list[int]  # seq2seq label lengths (empty for causal models)
    safe_min: int  # the shortest max_length that cuts no answer (contexts may be shortened)
    n_train: int
    note: str


def data_lengths(config: LorakitConfig, task_type: str) -> DataLengths:
    """Token lengths of the training split, encoded exactly as training will encode them.

    Falls back to template.max_length (and says so) when the tokenizer cannot be loaded here.
    Raises the data's own errors (DataError, TemplateError): a plan of broken data is no plan.
    """
    import dataclasses

    from ..pipeline import prepare
    from ..prompting.encoding import Dropped, encode_example

    prepared = prepare(config, encode=False, task_type=task_type, require_tokenizer=False)
    train, max_length = prepared.splits.train, config.template.max_length
    if prepared.tokenizer is None:
        return DataLengths(
            [],
            [],
            1,
            len(train),
            f"tokenizer unavailable ({prepared.tokenizer_error}): assumed every sequence is template.max_length={max_length}",
        )
    template, tokenizer, kw = prepared.template, prepared.tokenizer, prepared.encode_options
    lengths, targets, safe_min, dropped = [], [], 1, 0
    for example in train:
        encoded = encode_example(example, template, tokenizer, **kw)
        if isinstance(encoded, Dropped):
            dropped += 1
            continue
        lengths.append(len(encoded.input_ids))
        if task_type == "seq2seq":
            targets.append(len(encoded.labels))
        bare = encoded
        if example.context:  # the context can be shortened; question and answer cannot
            bare = encode_example(dataclasses.replace(example, context=None), template, tokenizer, **kw)
        if not isinstance(bare, Dropped):
            safe_min = max(safe_min, len(bare.labels) if task_type == "seq2seq" else len(bare.input_ids))
    note = f"lengths from tokenizing the {len(lengths)} training examples (max_length {max_length})"
    if dropped:
        note += f"; {dropped} would be dropped as too long"
    return DataLengths(lengths, targets, safe_min, len(train), note)


def _padded_mean(lengths: list[int], batch: int, grouped: bool, seed: int) -> float:
    """Mean padded length of a batch: batches pad to their longest member."""
    if not lengths:
        return 0.0
    order = sorted(lengths) if grouped else random.Random(seed).sample(lengths, len(lengths))
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    return sum(max(c) * len(c) for c in chunks) / len(order)


def _task_type(config: LorakitConfig, shape: ModelShape) -> str:
    if config.model.task_type != "auto":
        return config.model.task_type
    return "seq2seq" if shape.is_seq2seq else "causal"


def estimate_memory(
    config: LorakitConfig, shape: ModelShape, gpu, seq_len: int, target_len: int | None = None
) -> MemoryEstimate:
    """Peak memory of this config's training step on `gpu` (a name or GpuSpec) at `seq_len` tokens."""
    spec = gpu if isinstance(gpu, GpuSpec) else gpu_spec(gpu)
    if spec.name == "cpu" and config.model.quantization != "none":
        raise ModelError(
            f"model.quantization={config.model.quantization}: bitsandbytes k-bit quantization (QLoRA) needs a CUDA GPU, but the plan is for the CPU.",
            hint="set model.quantization=none, or plan for a GPU with --gpu t4 (or l4, a100-40g, ...)",
        )
    weight_b, act_b, _ = precision_bytes(config, spec)
    return estimate_step_memory(
        shape,
        micro_batch=config.train.micro_batch_size,
        seq_len=seq_len,
        target_len=target_len,
        lora_r=config.lora.r,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        use_dora=config.lora.use_dora,
        quantization=config.model.quantization,
        weight_bytes_per_param=weight_b,
        act_bytes=act_b,
        optimizer=config.train.optimizer,
        gradient_checkpointing=config.train.gradient_checkpointing,
        attn=config.model.attn_implementation or "sdpa",
        device="cpu" if spec.name == "cpu" else "cuda",
    )


def estimate_time(config: LorakitConfig, shape: ModelShape, gpu, mean_len: float) -> TimeEstimate:
    """Seconds per optimizer step for this config on `gpu` with batches padded to `mean_len` tokens."""
    spec = gpu if isinstance(gpu, GpuSpec) else gpu_spec(gpu)
    modules = lora_modules(shape, config.lora.target_modules)
    t = config.train
    return step_time(
        shape,
        spec,
        n_lora=lora_param_count(shape, modules, config.lora.r),
        n_adapters=len(modules),
        tokens=t.micro_batch_size * t.gradient_accumulation * mean_len,
        seq_len=mean_len,
        micro_batches=t.gradient_accumulation,
        gradient_checkpointing=t.gradient_checkpointing,
        quantization=config.model.quantization,
    )
