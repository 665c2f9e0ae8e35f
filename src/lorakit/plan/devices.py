"""The devices a plan can target: memory and compute throughput, and time per step from FLOPs.

GPUs: usable memory as nvidia-smi reports it and the datasheet's dense bf16/fp16 peak, of which a
LoRA step sustains a stated share. The CPU: its RAM, and a float32 matmul rate measured on this
machine by a short micro-benchmark (cached only when measured on a quiet machine).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass

from ..errors import ConfigError, ModelError
from .memory import GIB, TimeEstimate, flops_per_token
from .shape import ModelShape

GPU_EFFICIENCY = 0.40  # share of the published dense peak a LoRA training step sustains
QUANT_SLOWDOWN = 0.70  # 4/8-bit weights are dequantized before every matmul
CPU_EFFICIENCY = 0.50  # share of the measured matmul rate a whole CPU training step sustains
# Per operator, a training step costs Python module calls, autograd bookkeeping and the dispatch
# itself: measured at ~6x a bare tensor add on CPU (torch 2.13); on a GPU, ~10 us of launch and
# Python per operator. Operators per layer and micro-batch (forward + backward, counted with a
# dispatch mode on transformers' Llama + peft): ~150, plus ~60 per LoRA-wrapped linear layer.
CPU_OP_FACTOR = 6.0
GPU_OP_SECONDS = 10e-6
OPS_PER_LAYER, OPS_PER_ADAPTER, CHECKPOINT_OPS = 150, 60, 1.45


@dataclass
class GpuSpec:
    name: str
    memory_bytes: int
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s (CPU: measured float32 matmul rate)
    bf16: bool
    label: str
    op_seconds: float = GPU_OP_SECONDS  # fixed cost per operator in a training step


# Usable memory as nvidia-smi reports it; dense (non-sparse) bf16 or fp16 peaks from the datasheets.
GPUS = {
    "t4": GpuSpec("t4", int(15.0 * GIB), 65e12, False, "NVIDIA T4 16 GB (fp16 65 TFLOPs)"),
    "l4": GpuSpec("l4", int(22.5 * GIB), 121e12, True, "NVIDIA L4 24 GB (bf16 121 TFLOPs)"),
    "a10g": GpuSpec("a10g", int(22.5 * GIB), 70e12, True, "NVIDIA A10G 24 GB (bf16 70 TFLOPs)"),
    "a100-40g": GpuSpec("a100-40g", int(39.5 * GIB), 312e12, True, "NVIDIA A100 40 GB (bf16 312 TFLOPs)"),
    "a100-80g": GpuSpec("a100-80g", int(79.2 * GIB), 312e12, True, "NVIDIA A100 80 GB (bf16 312 TFLOPs)"),
    "h100": GpuSpec("h100", int(79.6 * GIB), 989e12, True, "NVIDIA H100 80 GB SXM (bf16 989 TFLOPs)"),
}
DEVICES = ["cpu", *GPUS]


# The CPU rate is measured, not looked up, and a measurement taken while other jobs run is low (once
# it made a plan predict 3.8 h for a run that took far less). So each figure is the best of a few
# short runs, an entry is trusted as it is only when the machine was quiet when it was measured,
# and it is measured again after CPU_RATE_MAX_AGE_DAYS; a busy measurement is used for that call
# and stored only as "best seen so far", so it is measured again (and improved on) next time.
CPU_RATE_REPEATS = 5  # short runs per figure; the best counts (others' jobs only ever slow a run)
CPU_RATE_RUN_SECONDS = 0.06  # each matmul run: 5 x 0.06 s, the ~0.3 s the single run used to take
QUIET_LOAD_PER_CORE = 0.3  # 1-minute load average per core below which the machine counts as quiet
CPU_RATE_MAX_AGE_DAYS = 7.0


def _load_per_core() -> float:
    """The 1-minute load average per core (0 where the system does not report one)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):  # Windows has no load average
        return 0.0


def _best_rate(run, seconds: float, repeats: int, timer=time.perf_counter) -> float:
    """The best of `repeats` timings of `run` (each repeated for about `seconds`), in calls per second."""
    best = 0.0
    for _ in range(repeats):
        calls, started = 0, timer()
        while True:
            run()
            calls += 1
            elapsed = timer() - started
            if elapsed >= seconds:
                break
        best = max(best, calls / elapsed)
    return best


def _measure_cpu_rates() -> tuple[float, float]:
    """(float32 matmul FLOP/s, seconds per training-step operator), each the best of a few short runs."""
    import torch

    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    flops = 2 * n**3 * _best_rate(lambda: a @ b, CPU_RATE_RUN_SECONDS, CPU_RATE_REPEATS)
    x, y = torch.ones(64), torch.ones(64)

    def hundred_adds() -> None:  # timed in blocks, so the timer's own cost stays out of the figure
        for _ in range(100):
            x + y

    adds = 100 * _best_rate(hundred_adds, 0.01, CPU_RATE_REPEATS)
    return flops, CPU_OP_FACTOR / adds


def cpu_rates(use_cache: bool = True) -> tuple[float, float]:
    """(float32 matmul FLOP/s, seconds per training-step operator) of this machine at torch's current
    thread count: a ~0.4 s micro-benchmark (best of a few runs), cached per machine under the
    lorakit cache folder when the machine was quiet (see CPU_RATE_MAX_AGE_DAYS above)."""
    flops, op_seconds, _ = _cpu_rates(use_cache)
    return flops, op_seconds


def _cpu_rates(use_cache: bool) -> tuple[float, float, bool]:
    """cpu_rates, and whether they come from a quiet machine."""
    import torch

    from ..files import cache_root

    key = f"{platform.machine()}|{platform.processor()}|{os.cpu_count()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = cache_root() / "cpu_rates.json"
    cached: dict = {}
    if use_cache and path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cached = {}
    entry = cached.get(key)
    if not isinstance(entry, dict) or time.time() - entry.get("measured_at", 0) > CPU_RATE_MAX_AGE_DAYS * 86400:
        entry = None  # none, expired, or the old unchecked [flops, op_seconds] format: measure again
    if entry is not None and entry.get("quiet"):
        return float(entry["flops"]), float(entry["op_seconds"]), True
    quiet = _load_per_core() < QUIET_LOAD_PER_CORE
    flops, op_seconds = _measure_cpu_rates()
    if entry is not None:  # a busy measurement from before: keep the best of both
        flops, op_seconds = max(flops, float(entry["flops"])), min(op_seconds, float(entry["op_seconds"]))
    if use_cache:
        record = {"flops": flops, "op_seconds": op_seconds, "measured_at": time.time(), "quiet": quiet}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**cached, key: record}, indent=1), encoding="utf-8")
        except OSError:
            pass  # a read-only home only costs re-measuring next time
    return flops, op_seconds, quiet


def gpu_spec(gpu: str = "cpu", memory_gb: float | None = None) -> GpuSpec:
    """The device to plan for; `memory_gb` overrides its memory (e.g. a share of a GPU, or RAM)."""
    gpu = gpu.lower()
    if gpu == "cpu":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        flops, op_seconds, quiet = _cpu_rates(use_cache=True)
        how = "rates measured" if quiet else "rates measured while other jobs ran: the times are upper bounds"
        spec = GpuSpec("cpu", ram, flops, False, f"this CPU ({os.cpu_count()} cores, {how})", op_seconds)
    elif gpu in GPUS:
        spec = GPUS[gpu]
    else:
        raise ConfigError(f"--gpu: unknown device '{gpu}'.", hint=f"use one of: {', '.join(DEVICES)}")
    if memory_gb is not None:
        if memory_gb <= 0:
            raise ConfigError(
                f"--memory-gb: must be positive (got {memory_gb}).",
                hint="give the device memory in GiB, e.g. --memory-gb 16",
            )
        spec = GpuSpec(
            spec.name,
            int(memory_gb * GIB),
            spec.peak_flops,
            spec.bf16,
            f"{spec.label}, {memory_gb:g} GiB",
            spec.op_seconds,
        )
    return spec


def precision_bytes(config, spec: GpuSpec) -> tuple[int, int, str]:
    """(bytes per frozen weight, bytes per activation, precision name), as models.precision.choose_precision
    would pick them on that device (float16 keeps fp32 weights under autocast)."""
    requested = config.model.precision
    if spec.name == "cpu":
        if requested == "float16":
            raise ModelError(
                "model.precision: float16 training needs a CUDA GPU (mixed precision with loss scaling), but the plan is for the CPU.",
                hint="set model.precision=auto (float32 on CPU), or plan for a GPU with --gpu",
            )
        return (2, 2, "bfloat16") if requested == "bfloat16" else (4, 4, "float32")
    if requested == "float32":
        return 4, 4, "float32"
    if requested == "bfloat16" and not spec.bf16:
        raise ModelError(
            f"model.precision: bfloat16 was requested but the {spec.name} does not support it.",
            hint="set model.precision=float16 (or auto, which picks float16 there)",
        )
    if requested == "bfloat16" or (requested == "auto" and spec.bf16):
        return 2, 2, "bfloat16"
    return 4, 2, "float16"


def step_time(
    shape: ModelShape,
    spec: GpuSpec,
    *,
    n_lora: int,
    n_adapters: int,
    tokens: float,
    seq_len: float,
    micro_batches: int = 1,
    gradient_checkpointing: bool = False,
    quantization: str = "none",
    labelled_tokens: float | None = None,
) -> TimeEstimate:
    """Seconds per optimizer step: FLOPs per token x tokens / sustained FLOP/s (a stated share of the
    device's peak), plus a fixed cost per operator for each micro-batch (n_adapters: LoRA-wrapped
    linear layers per transformer layer). `labelled_tokens` (per step): only those reach the output
    head (train.labelled_logits_only), at 6*V*d each: forward, its recomputation, the input gradient."""
    per_token, formula = flops_per_token(
        shape, n_lora, int(seq_len), gradient_checkpointing, head=labelled_tokens is None
    )
    if labelled_tokens is not None and tokens > 0:
        per_token += 6 * shape.vocab_size * shape.hidden_size * labelled_tokens / tokens
        formula += " (N without the output head) + 6*V*d per labelled position"
    if spec.name == "cpu":
        rate, how = spec.peak_flops * CPU_EFFICIENCY, f"{CPU_EFFICIENCY:.0%} of the measured matmul rate"
    else:
        rate, how = spec.peak_flops * GPU_EFFICIENCY, f"{GPU_EFFICIENCY:.0%} of the published peak"
        if quantization != "none":
            rate, how = rate * QUANT_SLOWDOWN, how + f" x {QUANT_SLOWDOWN} for dequantization"
    layers = shape.num_layers + shape.num_decoder_layers
    ops = layers * (OPS_PER_LAYER + OPS_PER_ADAPTER * n_adapters) * (CHECKPOINT_OPS if gradient_checkpointing else 1)
    seconds = per_token * tokens / rate + ops * micro_batches * spec.op_seconds
    return TimeEstimate(
        per_token,
        rate,
        seconds,
        f"FLOPs/token = {formula}; device at {how}; "
        f"+ {ops:.0f} operators per micro-batch at {spec.op_seconds * 1e6:.0f} us each",
    )


def detect_device() -> tuple[str, float | None]:
    """The device training will run on, as a DEVICES name plus its real memory in GB.

    An unlisted GPU maps to the listed one of the same bf16 capability (its memory is what
    counts for fitting): l4 when it has bf16, t4 otherwise.
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name().lower()
    memory_gb = torch.cuda.get_device_properties(0).total_memory / GIB
    for key in ("h100", "a100", "a10g", "l4", "t4"):
        if key in name:
            if key == "a100":
                key = "a100-80g" if memory_gb > 45 else "a100-40g"
            return key, memory_gb
    return ("l4" if torch.cuda.is_bf16_supported() else "t4"), memory_gb
