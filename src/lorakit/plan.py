"""`lorakit plan`: know before you run. Peak memory by part, time per step and for the run, whether
it fits the device, and (with --fit) the micro-batch / checkpointing / 4-bit / max-length changes
that make it fit. Nothing here loads model weights: the shape comes from config.json or a GGUF
header (`shape.read_model_shape`), sequence lengths from tokenizing the real training data.

Memory is the peak of live tensor bytes (what `torch.cuda.max_memory_allocated` reports) plus a
stated overhead; see `lorakit.memory` for what is counted and how it was checked.
"""

from __future__ import annotations

import gc
import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Optional

from .config import LorakitConfig, load_config
from .devices import DEVICES, GPUS, GpuSpec, cpu_rates, gpu_spec, precision_bytes, step_time
from .errors import ModelError
from .memory import MemoryEstimate, TimeEstimate, estimate_step_memory, fmt_bytes, lora_modules, lora_param_count
from .shape import ModelShape, read_model_shape

logger = logging.getLogger(__name__)

__all__ = [
    "DEVICES", "GPUS", "DataLengths", "GpuSpec", "Plan", "cpu_rates", "data_lengths", "estimate_memory", "estimate_time",
    "fit_config", "gpu_spec", "plan_command", "precision_bytes", "plan_run", "read_model_shape", "render_plan", "run_with_oom_backoff",
    "step_time",
]


# --- the data's real lengths -------------------------------------------------------------------


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

    from .data import load_splits
    from .modeling import load_tokenizer
    from .templates import resolve_template
    from .tokenize import Dropped, encode_example

    splits = load_splits(config.data)
    train = splits.train
    max_length = config.template.max_length
    try:
        tokenizer = load_tokenizer(config.model)
    except ModelError as exc:
        return DataLengths([], [], 1, len(train), f"tokenizer unavailable ({exc.message}): assumed every sequence is template.max_length={max_length}")
    has_context = any(e.context for e in train)
    template = resolve_template(config.template, tokenizer, task_type, has_context=has_context)
    kw = dict(train_on_prompt=config.template.train_on_prompt, system=config.template.system_prompt, task_type=task_type)
    lengths, targets, safe_min, dropped = [], [], 1, 0
    for example in train:
        encoded = encode_example(example, template, tokenizer, max_length=max_length, **kw)
        if isinstance(encoded, Dropped):
            dropped += 1
            continue
        lengths.append(len(encoded.input_ids))
        if task_type == "seq2seq":
            targets.append(len(encoded.labels))
        bare = encoded
        if example.context:  # the context can be shortened; question and answer cannot
            bare = encode_example(dataclasses.replace(example, context=None), template, tokenizer, max_length=max_length, **kw)
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
    chunks = [order[i: i + batch] for i in range(0, len(order), batch)]
    return sum(max(c) * len(c) for c in chunks) / len(order)


# --- the plan ---------------------------------------------------------------------------------


@dataclass
class Plan:
    config: LorakitConfig
    shape: ModelShape
    device: GpuSpec
    precision: str
    seq_len: int  # the longest batch's padded length: what peak memory depends on
    target_len: Optional[int]
    memory: MemoryEstimate
    time: TimeEstimate
    steps: int
    tokens_per_epoch: int
    epochs: float
    n_train: int
    notes: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.device.memory_bytes

    @property
    def total_seconds(self) -> float:
        return self.steps * self.time.seconds_per_step


def _task_type(config: LorakitConfig, shape: ModelShape) -> str:
    if config.model.task_type != "auto":
        return config.model.task_type
    return "seq2seq" if shape.is_seq2seq else "causal"


def estimate_memory(config: LorakitConfig, shape: ModelShape, gpu, seq_len: int, target_len: Optional[int] = None) -> MemoryEstimate:
    """Peak memory of this config's training step on `gpu` (a name or GpuSpec) at `seq_len` tokens."""
    spec = gpu if isinstance(gpu, GpuSpec) else gpu_spec(gpu)
    if spec.name == "cpu" and config.model.quantization != "none":
        raise ModelError(
            f"model.quantization={config.model.quantization}: bitsandbytes k-bit quantization (QLoRA) needs a CUDA GPU, but the plan is for the CPU.",
            hint="set model.quantization=none, or plan for a GPU with --gpu t4 (or l4, a100-40g, ...)",
        )
    weight_b, act_b, _ = precision_bytes(config, spec)
    return estimate_step_memory(
        shape, micro_batch=config.train.micro_batch_size, seq_len=seq_len, target_len=target_len,
        lora_r=config.lora.r, lora_dropout=config.lora.dropout, target_modules=config.lora.target_modules,
        use_dora=config.lora.use_dora, quantization=config.model.quantization, weight_bytes_per_param=weight_b,
        act_bytes=act_b, optimizer=config.train.optimizer, gradient_checkpointing=config.train.gradient_checkpointing,
        attn=config.model.attn_implementation or "sdpa", device="cpu" if spec.name == "cpu" else "cuda",
    )


def estimate_time(config: LorakitConfig, shape: ModelShape, gpu, mean_len: float) -> TimeEstimate:
    """Seconds per optimizer step for this config on `gpu` with batches padded to `mean_len` tokens."""
    spec = gpu if isinstance(gpu, GpuSpec) else gpu_spec(gpu)
    modules = lora_modules(shape, config.lora.target_modules)
    t = config.train
    return step_time(
        shape, spec, n_lora=lora_param_count(shape, modules, config.lora.r), n_adapters=len(modules),
        tokens=t.micro_batch_size * t.gradient_accumulation * mean_len, seq_len=mean_len,
        micro_batches=t.gradient_accumulation, gradient_checkpointing=t.gradient_checkpointing,
        quantization=config.model.quantization,
    )


def plan_run(config: LorakitConfig, gpu: str = "cpu", memory_gb: Optional[float] = None, *,
             shape: Optional[ModelShape] = None, lengths: Optional[DataLengths] = None, advise: bool = True) -> Plan:
    """Predict memory and time for training `config` on `gpu`, without loading any weights.

    Raises:
        ModelError: the model cannot be read, or the precision/quantization cannot run on `gpu`.
        DataError, TemplateError: the training data cannot be loaded or rendered.
    """
    spec = gpu_spec(gpu, memory_gb)
    shape = shape or read_model_shape(config.model)
    task_type = _task_type(config, shape)
    lengths = lengths or data_lengths(config, task_type)
    max_length = config.template.max_length
    notes = [lengths.note]
    if lengths.lengths:
        seq = min(max(lengths.lengths), max_length)
        target = min(max(lengths.target_lengths), max_length) if lengths.target_lengths else None
        mean = _padded_mean(lengths.lengths, config.train.micro_batch_size, config.train.group_by_length, config.train.seed)
        tokens = sum(lengths.lengths)
    else:
        seq, target, mean, tokens = max_length, (max_length if task_type == "seq2seq" else None), max_length, max_length * lengths.n_train
    memory = estimate_memory(config, shape, spec, seq, target)
    time_est = estimate_time(config, shape, spec, mean + (sum(lengths.target_lengths) / len(lengths.target_lengths) if lengths.target_lengths else 0))
    per_step = config.train.micro_batch_size * config.train.gradient_accumulation
    steps_per_epoch = max(1, -(-lengths.n_train // per_step))
    if config.train.max_steps > 0:
        steps, epochs = config.train.max_steps, config.train.max_steps / steps_per_epoch
    else:
        steps, epochs = int(-(-config.train.epochs * steps_per_epoch // 1)), config.train.epochs
    _, _, precision = precision_bytes(config, spec)
    if spec.name == "cpu" and precision == "bfloat16":
        notes.append("bfloat16 on a CPU usually runs far below the float32 rate the time assumes; auto picks float32")
    plan = Plan(config, shape, spec, precision, seq, target, memory, time_est, steps, tokens, epochs, lengths.n_train, notes + memory.notes)
    if advise and not plan.fits:
        fitted, choices = fit_config(config, gpu, memory_gb, shape=shape, lengths=lengths)
        plan.advice = choices + ["run `lorakit plan --fit` to see the fitted plan, or set train.auto_fit: true"]
    return plan


# --- fitting ----------------------------------------------------------------------------------


def _fits(config, shape, spec, lengths, max_length: Optional[int] = None) -> bool:
    limit = max_length or config.template.max_length
    seq = min(max(lengths.lengths), limit) if lengths.lengths else limit
    target = min(max(lengths.target_lengths), limit) if lengths.target_lengths else None
    return estimate_memory(config, shape, spec, seq, target).total <= spec.memory_bytes


def _largest_micro_batch(config, shape, spec, lengths) -> Optional[int]:
    """The largest divisor of the effective batch that fits, so the effective batch stays exact."""
    effective = config.train.micro_batch_size * config.train.gradient_accumulation
    for micro in sorted((d for d in range(1, effective + 1) if effective % d == 0), reverse=True):
        config.train.micro_batch_size, config.train.gradient_accumulation = micro, effective // micro
        if _fits(config, shape, spec, lengths):
            return micro
    return None


def fit_config(config: LorakitConfig, gpu: str = "cpu", memory_gb: Optional[float] = None, *,
               shape: Optional[ModelShape] = None, lengths: Optional[DataLengths] = None) -> tuple[LorakitConfig, list[str]]:
    """A copy of `config` that fits `gpu`, and each choice made with its reason.

    In order: the largest micro-batch that fits (gradient accumulation keeps the effective batch);
    then gradient checkpointing; then 4-bit quantization (GPUs only); then a shorter max_length,
    never below the length that keeps every answer whole. If nothing fits the last choice says so.
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
        seq = min(max(lengths.lengths), new.template.max_length) if lengths.lengths else new.template.max_length
        return fmt_bytes(estimate_memory(new, shape, spec, seq).total)

    if not new.train.gradient_checkpointing:
        choices.append(
            f"train.gradient_checkpointing=true: even micro-batch 1 needs {need()}; checkpointing keeps only "
            "each layer's input and recomputes the rest in backward (about a third more compute)"
        )
        new.train.gradient_checkpointing = True
        if batch_choice(" with checkpointing"):
            return new, choices
    if spec.name != "cpu" and new.model.quantization != "4bit":
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
        f"{fmt_bytes(estimate_memory(new, shape, spec, lengths.safe_min).total)}"
        if lengths.lengths else " needs more (without the tokenizer max_length cannot be shortened safely)"
    )
    choices.append(
        f"nothing fits {budget}: even micro-batch 1 with checkpointing"
        + (" and 4-bit weights" if spec.name != "cpu" else "") + shortest + "; use a smaller model or a bigger device"
    )
    return new, choices


# --- out of memory at run time ------------------------------------------------------------------


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(oom, type) and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def run_with_oom_backoff(run_fn: Callable[[LorakitConfig], object], config: LorakitConfig,
                         log: Callable[[str], None] = logger.warning):
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


# --- showing it -----------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render_plan(plan: Plan, choices: Optional[list[str]] = None, console=None) -> str:
    """Print the plan with rich (to `console`, default stdout) and return it as plain text."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(record=True)
    if not console.record:
        console.record = True
    s = plan.shape
    console.print(
        f"[bold]{s.model_type}[/bold] from {s.source}: {s.n_params / 1e6:.1f}M parameters, {s.num_layers} layers"
        f"{f' + {s.num_decoder_layers} decoder layers' if s.is_seq2seq else ''}, hidden {s.hidden_size}, "
        f"{s.num_heads} heads ({s.num_kv_heads} kv), intermediate {s.intermediate_size}, vocab {s.vocab_size}"
        f"{', tied embeddings' if s.tied_embeddings else ''}"
    )
    t = plan.config.train
    console.print(
        f"device: {plan.device.label}; precision {plan.precision}\n"
        f"batch: micro-batch {t.micro_batch_size} x accumulation {t.gradient_accumulation}; longest batch {plan.seq_len} tokens"
        f"{f' (target {plan.target_len})' if plan.target_len else ''}; checkpointing {'on' if t.gradient_checkpointing else 'off'}"
    )
    table = Table(title="Predicted peak memory")
    table.add_column("part")
    table.add_column("memory", justify="right")
    table.add_column("share", justify="right")
    total = plan.memory.total
    for name, nbytes in [*plan.memory.parts.items(), ("overhead", plan.memory.overhead)]:
        table.add_row(name, fmt_bytes(nbytes), f"{100 * nbytes / total:.0f}%")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    table.add_row("[bold]total[/bold]", f"[bold]{fmt_bytes(total)}[/bold]", f"{verdict} in {fmt_bytes(plan.device.memory_bytes)}")
    console.print(table)
    console.print(
        f"time: {_duration(plan.time.seconds_per_step)} per step x {plan.steps} steps = {_duration(plan.total_seconds)} "
        f"({plan.epochs:g} epochs of {plan.n_train} examples: {plan.tokens_per_epoch} tokens per epoch, "
        f"{int(plan.tokens_per_epoch * plan.epochs)} in all)"
    )
    console.print(f"  {plan.time.flops_per_token / 1e6:.1f} MFLOPs/token at {plan.time.device_flops / 1e12:.3g} TFLOP/s; {plan.time.formula}")
    for note in plan.notes:
        console.print(f"  note: {note}")
    if choices:
        console.print("[bold]fitted[/bold]:")
        for choice in choices:
            console.print(f"  - {choice}")
    if plan.advice:
        console.print("[bold]to make it fit[/bold]:")
        for line in plan.advice:
            console.print(f"  - {line}")
    return console.export_text()


def plan_command(config_path, overrides: Optional[list[str]] = None, gpu: str = "cpu",
                 memory_gb: Optional[float] = None, fit: bool = False, console=None) -> str:
    """`lorakit plan config.yaml [--gpu ...] [--memory-gb N] [--fit]`: print the plan, return its text.
    With --fit (or train.auto_fit: true) the plan shown is the fitted config's, with each choice."""
    config = load_config(config_path, overrides)
    choices = None
    if fit or config.train.auto_fit:
        shape = read_model_shape(config.model)
        lengths = data_lengths(config, _task_type(config, shape))
        config, choices = fit_config(config, gpu, memory_gb, shape=shape, lengths=lengths)
        plan = plan_run(config, gpu, memory_gb, shape=shape, lengths=lengths)
    else:
        plan = plan_run(config, gpu, memory_gb)
    return render_plan(plan, choices, console)
