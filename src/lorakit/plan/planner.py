"""`lorakit plan`: know before you run. Peak memory by part, time per step and for the run, whether
it fits the device, and (with --fit) the micro-batch / checkpointing / 4-bit / max-length changes
that make it fit. Nothing here loads model weights: the shape comes from config.json or a GGUF
header (`shape.read_model_shape`), sequence lengths from tokenizing the real training data.

Memory is the peak of live tensor bytes (what `torch.cuda.max_memory_allocated` reports) plus a
stated overhead; see `lorakit.memory` for what is counted and how it was checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..config import LorakitConfig
from .devices import GpuSpec, gpu_spec, precision_bytes
from .estimate import (
    DataLengths,
    _task_type,
    data_lengths,
    estimate_time,
    packing_mode,
    peak_memory,
    plan_batches,
)
from .fitting import fit_config
from .memory import (
    MemoryEstimate,
    TimeEstimate,
)
from .shape import ModelShape, read_model_shape

logger = logging.getLogger("lorakit.plan")

# --- the data's real lengths -------------------------------------------------------------------


# --- the plan ---------------------------------------------------------------------------------


@dataclass
class Plan:
    config: LorakitConfig
    shape: ModelShape
    device: GpuSpec
    precision: str
    seq_len: int  # the longest batch's padded length: what peak memory depends on
    target_len: int | None
    memory: MemoryEstimate
    time: TimeEstimate
    steps: int
    tokens_per_epoch: int
    epochs: float
    n_train: int
    notes: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    packing: str = "off"  # passages, examples or off, as training will run
    rows: int | None = None  # rows of the micro-batch that needs the most memory (packed: of seq_len tokens)
    computed_tokens: int | None = None  # per epoch, padding included (packed: the passage once)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.device.memory_bytes

    @property
    def total_seconds(self) -> float:
        return self.steps * self.time.seconds_per_step


def plan_run(
    config: LorakitConfig,
    gpu: str = "cpu",
    memory_gb: float | None = None,
    *,
    shape: ModelShape | None = None,
    lengths: DataLengths | None = None,
    advise: bool = True,
) -> Plan:
    """Predict memory and time for training `config` on `gpu`, without loading any weights.

    Args:
        config: a validated config.
        gpu: "t4", "l4", "a10g", "a100-40g", "a100-80g", "h100" or "cpu" (plan.devices.DEVICES).
        memory_gb: override the device's memory.
        shape, lengths: the model shape and data lengths, when the caller already read them.
        advise: add suggestions for a plan that does not fit.

    Returns:
        The plan: peak memory part by part, time per step and per run, notes and advice.

    Raises:
        ModelError: the model cannot be read, or the precision/quantization cannot run on `gpu`.
        DataError, TemplateError: the training data cannot be loaded or rendered.
    """
    spec = gpu_spec(gpu, memory_gb)
    shape = shape or read_model_shape(config.model)
    task_type = _task_type(config, shape)
    lengths = lengths or data_lengths(config, task_type)
    notes = [lengths.note]
    batches = plan_batches(config, lengths, task_type)
    memory, (rows, seq, _) = peak_memory(config, shape, spec, batches)
    time_est = estimate_time(
        config,
        shape,
        spec,
        batches.tokens_per_micro_batch / config.train.micro_batch_size,
        batches.mean_row,
        batches.labelled_per_micro_batch,
    )
    tokens = sum(lengths.lengths) if lengths.lengths else config.template.max_length * lengths.n_train
    if batches.packed:
        padded = plan_batches(config, lengths, task_type, mode="off").computed_tokens
        notes.append(
            f"packing {batches.mode}: {batches.computed_tokens} tokens per epoch to compute (row padding included) "
            f"against {padded} padded one example per row ({padded / max(batches.computed_tokens, 1):.2f}x) and "
            f"{tokens} in the examples; the peak micro-batch is {rows} row(s) x {seq} tokens"
        )
    elif packing_mode(config, task_type) != "off":
        notes.append("packing not planned (the tokenizer is unavailable): planned as padded micro-batches")
    # the Trainer's steps per epoch: micro-batches / accumulation (packing keeps examples per micro-batch)
    steps_per_epoch = max(1, -(-batches.micro_batches // config.train.gradient_accumulation))
    if config.train.max_steps > 0:
        steps, epochs = config.train.max_steps, config.train.max_steps / steps_per_epoch
    else:
        steps, epochs = int(-(-config.train.epochs * steps_per_epoch // 1)), config.train.epochs
    _, _, precision = precision_bytes(config, spec)
    if spec.name == "cpu" and precision == "bfloat16":
        notes.append("bfloat16 on a CPU usually runs far below the float32 rate the time assumes; auto picks float32")
    plan = Plan(
        config,
        shape,
        spec,
        precision,
        seq,
        batches.target_len,
        memory,
        time_est,
        steps,
        tokens,
        epochs,
        lengths.n_train,
        notes + memory.notes,
        packing=batches.mode,
        rows=rows,
        computed_tokens=batches.computed_tokens,
    )
    if advise and not plan.fits:
        fitted, choices = fit_config(config, gpu, memory_gb, shape=shape, lengths=lengths)
        plan.advice = choices + ["run `lorakit plan --fit` to see the fitted plan, or set train.auto_fit: true"]
    return plan


# --- fitting ----------------------------------------------------------------------------------


# --- out of memory at run time ------------------------------------------------------------------


# --- showing it -----------------------------------------------------------------------------------
