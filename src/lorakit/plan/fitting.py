"""Fitting a config to a device: the largest micro-batch that fits, and the OOM back-off around a run."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TypeVar

from ..config import LorakitConfig
from ..errors import ModelError
from .devices import GpuSpec, gpu_spec
from .estimate import DataLengths, _task_type, data_lengths, peak_memory, plan_batches
from .memory import (
    fmt_bytes,
)
from .shape import ModelShape, read_model_shape

logger = logging.getLogger("lorakit.plan")
T = TypeVar("T")  # what the wrapped run returns (train: RunPaths)


def _need(
    config: LorakitConfig, shape: ModelShape, spec: GpuSpec, lengths: DataLengths, max_length: int | None = None
) -> int:
    """Bytes the config's largest micro-batch needs (its micro-batches planned as training plans them)."""
    batches = plan_batches(config, lengths, _task_type(config, shape), max_length)
    return peak_memory(config, shape, spec, batches)[0].total


def _fits(
    config: LorakitConfig, shape: ModelShape, spec: GpuSpec, lengths: DataLengths, max_length: int | None = None
) -> bool:
    return _need(config, shape, spec, lengths, max_length) <= spec.memory_bytes


def _largest_micro_batch(config: LorakitConfig, shape: ModelShape, spec: GpuSpec, lengths: DataLengths) -> int | None:
    """The largest divisor of the effective batch that fits, so the effective batch stays exact."""
    effective = config.train.micro_batch_size * config.train.gradient_accumulation
    for micro in sorted((d for d in range(1, effective + 1) if effective % d == 0), reverse=True):
        config.train.micro_batch_size, config.train.gradient_accumulation = micro, effective // micro
        if _fits(config, shape, spec, lengths):
            return micro
    return None


def fit_config(
    config: LorakitConfig,
    gpu: str = "cpu",
    memory_gb: float | None = None,
    *,
    shape: ModelShape | None = None,
    lengths: DataLengths | None = None,
) -> tuple[LorakitConfig, list[str]]:
    """A copy of `config` that fits `gpu`, and each choice made with its reason.

    In order: the largest micro-batch that fits (gradient accumulation keeps the effective batch);
    then gradient checkpointing; then 4-bit quantization (on a CPU plan only where the installed bitsandbytes runs it); then a shorter max_length,
    never below the length that keeps every answer whole. If nothing fits the last choice says so.

    Args:
        config: a validated config (not changed).
        gpu, memory_gb: the device, as for plan_run.
        shape, lengths: the model shape and data lengths, when the caller already read them.

    Returns:
        (the fitted config, one line per choice made, each with its reason).

    Raises:
        ModelError: the model cannot be read, or the precision/quantization cannot run on `gpu`.
        DataError, TemplateError: the training data cannot be loaded or rendered.
    """
    spec = gpu_spec(gpu, memory_gb)
    shape = shape or read_model_shape(config.model)
    lengths = lengths or data_lengths(config, _task_type(config, shape))
    new = config.model_copy(deep=True)
    asked = (config.train.micro_batch_size, config.train.gradient_accumulation)
    effective = asked[0] * asked[1]
    choices: list[str] = []
    budget = f"{fmt_bytes(spec.memory_bytes)} on {spec.name}"

    def batch_choice(why: str) -> bool:
        micro = _largest_micro_batch(new, shape, spec, lengths)
        if micro is None:
            new.train.micro_batch_size, new.train.gradient_accumulation = 1, effective
            return False
        if (micro, effective // micro) != asked:
            choices.append(
                f"train.micro_batch_size={micro}, train.gradient_accumulation={effective // micro}: the largest "
                f"micro-batch that fits {budget}{why}; the effective batch stays {effective}"
            )
        return True

    if batch_choice(""):
        if not choices:
            choices.append(f"no change: micro-batch {asked[0]} already fits {budget}")
        return new, choices

    def need() -> str:  # what micro-batch 1 needs as things stand
        return fmt_bytes(_need(new, shape, spec, lengths))

    if not new.train.gradient_checkpointing:
        choices.append(
            f"train.gradient_checkpointing=true: even micro-batch 1 needs {need()}; checkpointing keeps only "
            "each layer's input and recomputes the rest in backward (about a third more compute)"
        )
        new.train.gradient_checkpointing = True
        if batch_choice(" with checkpointing"):
            return new, choices
    if new.model.quantization != "4bit" and _can_quantize(spec.name):
        choices.append(
            f"model.quantization=4bit: micro-batch 1 with checkpointing still needs {need()}; NF4 with double "
            "quantization (QLoRA) stores the linear weights in about 4.1 bits each"
        )
        new.model.quantization = "4bit"
        if batch_choice(" with 4-bit weights"):
            return new, choices
    if lengths.lengths:
        low, high = lengths.safe_min, min(max(lengths.lengths), new.template.max_length) - 1
        best = None
        while low <= high:  # memory grows with length: binary search the longest that fits
            mid = (low + high) // 2
            if _fits(new, shape, spec, lengths, mid):
                best, low = mid, mid + 1
            else:
                high = mid - 1
        if best is not None:
            new.template.max_length = best
            cut = sum(1 for n in lengths.lengths if n > best)
            choices.append(
                f"template.max_length={best}: the longest that fits at micro-batch 1; {cut} example(s) get their context "
                f"shortened, no answer is cut (the longest question + answer needs {lengths.safe_min} tokens)"
            )
            return new, choices
    shortest = (
        f" and the shortest max_length that cuts no answer ({lengths.safe_min}) needs "
        f"{fmt_bytes(_need(new, shape, spec, lengths, lengths.safe_min))}"
        if lengths.lengths
        else " needs more (without the tokenizer max_length cannot be shortened safely)"
    )
    choices.append(
        f"nothing fits {budget}: even micro-batch 1 with checkpointing"
        + (" and 4-bit weights" if spec.name != "cpu" else "")
        + shortest
        + "; use a smaller model or a bigger device"
    )
    return new, choices


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(oom, type) and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def _can_quantize(device: str) -> bool:
    """A GPU plan may always suggest 4-bit (the GPU is elsewhere); a CPU plan is for this machine."""
    if device != "cpu":
        return True
    from ..models import kbit

    return kbit.supports("quantization", "cpu")


def run_with_oom_backoff(
    run_fn: Callable[[LorakitConfig], T], config: LorakitConfig, log: Callable[[str], None] = logger.warning
) -> T:
    """Call run_fn(config); on an out-of-memory error, halve the micro-batch (doubling the gradient
    accumulation, so the effective batch is unchanged) and call it again, down to micro-batch 1.

    Meant to wrap the first steps of training: a retry restarts run_fn from scratch.
    Raises:
        ModelError: out of memory even at micro-batch 1 (with what to change).
    """
    import torch

    current = config
    while True:
        try:
            return run_fn(current)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(exc):
                raise
            micro, accum = current.train.micro_batch_size, current.train.gradient_accumulation
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if micro == 1:
                raise ModelError(
                    "out of memory even at train.micro_batch_size=1.",
                    hint="set train.gradient_checkpointing=true, model.quantization=4bit, or a smaller template.max_length; "
                    "`lorakit plan --fit` shows what fits",
                ) from exc
            effective = micro * accum
            smaller = max(d for d in range(1, micro // 2 + 1) if effective % d == 0)
            current = current.model_copy(deep=True)
            current.train.micro_batch_size, current.train.gradient_accumulation = smaller, effective // smaller
            log(
                f"out of memory at micro-batch {micro}: retrying with train.micro_batch_size={smaller}, "
                f"train.gradient_accumulation={effective // smaller} (effective batch {effective} unchanged)"
            )
