"""How close `lorakit plan` is: predicted vs measured peak memory and time per step on this CPU.

Each configuration trains a random-init LoRA model (no weights downloaded) for a few real steps;
peak memory is the peak of live tensor bytes (lorakit.memory.TensorMemoryTracker), the same
quantity a CUDA allocator reports as max_memory_allocated. Time is the wall time of one untracked
step after warm-up; the CPU matmul rate behind the time prediction is measured in this run.

    .venv/bin/python bench/bench_plan_accuracy.py            # tiny models + SmolLM2-135M size
    .venv/bin/python bench/bench_plan_accuracy.py --quick    # tiny models only
    .venv/bin/python bench/bench_plan_accuracy.py --threads 1  # on a CPU shared with other jobs
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
from transformers import AutoConfig, LlamaConfig

from lorakit.plan.devices import GpuSpec, cpu_rates, step_time
from lorakit.plan.measure import measure_lora_step
from lorakit.plan.memory import estimate_step_memory, fmt_bytes, lora_modules, lora_param_count
from lorakit.plan.shape import read_model_shape

warnings.filterwarnings("ignore")


def tiny(h=64, layers=2, heads=4, kv=2, inter=128, vocab=600, tied=False):
    return lambda: LlamaConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tied,
        max_position_embeddings=2048,
    )


def smollm2():
    """SmolLM2-135M's config: read from the converted folder when it exists, else written out."""
    try:
        from lorakit.demo.hubless import is_converted, model_dir

        if is_converted(model_dir()):
            return AutoConfig.from_pretrained(model_dir())
    except ImportError:
        pass
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rope_theta=100000,
    )


CONFIGS = [  # (name, model, step settings)
    ("tiny b2 s64 r8 all", tiny(), dict(micro_batch=2, seq_len=64, lora_r=8, target_modules="all-linear")),
    ("tiny b8 s128 r8 qv", tiny(), dict(micro_batch=8, seq_len=128, lora_r=8, target_modules="auto")),
    (
        "tiny b4 s256 r32 ckpt",
        tiny(),
        dict(micro_batch=4, seq_len=256, lora_r=32, target_modules="all-linear", gradient_checkpointing=True),
    ),
    (
        "small b4 s128 r16 eager",
        tiny(h=256, layers=4, inter=768, heads=8, kv=4, vocab=8000),
        dict(micro_batch=4, seq_len=128, lora_r=16, target_modules="all-linear", attn="eager"),
    ),
    (
        "small b8 s128 r16 nodrop",
        tiny(h=256, layers=4, inter=768, heads=8, kv=4, vocab=8000),
        dict(micro_batch=8, seq_len=128, lora_r=16, target_modules="all-linear", lora_dropout=0.0),
    ),
    (
        "small bf16 b4 s128 r16 all",
        tiny(h=256, layers=4, inter=768, heads=8, kv=4, vocab=8000),
        dict(micro_batch=4, seq_len=128, lora_r=16, target_modules="all-linear", dtype="bfloat16"),
    ),
    (
        "small b8 s256 r4 ckpt tied",
        tiny(h=256, layers=4, inter=768, heads=8, kv=4, vocab=32000, tied=True),
        dict(micro_batch=8, seq_len=256, lora_r=4, target_modules="auto", gradient_checkpointing=True),
    ),
]
SMOLLM = [
    ("SmolLM2-135M b1 s256 r16 all", smollm2, dict(micro_batch=1, seq_len=256, lora_r=16, target_modules="all-linear")),
    (
        "SmolLM2-135M b2 s256 r8 qv ckpt",
        smollm2,
        dict(micro_batch=2, seq_len=256, lora_r=8, target_modules="auto", gradient_checkpointing=True),
    ),
]


def main() -> None:
    configs = CONFIGS + ([] if "--quick" in sys.argv else SMOLLM)
    if "--threads" in sys.argv:  # e.g. 1 on a machine shared with other jobs, where threads fight
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    rate, op_seconds = cpu_rates(use_cache=False)
    cpu = GpuSpec("cpu", 0, rate, False, "this CPU", op_seconds)
    print(
        f"CPU measured now with {torch.get_num_threads()} thread(s): float32 matmul {rate / 1e9:.1f} GFLOP/s, "
        f"{op_seconds * 1e6:.0f} us per training-step operator"
    )
    header = f"{'configuration':34} {'predicted':>11} {'measured':>11} {'ratio':>6} | {'pred s/step':>11} {'meas s/step':>11} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    mem_ratios, time_ratios = [], []
    for name, make, step in configs:
        hf_config = make()
        shape = read_model_shape(hf_config)
        step = dict(step)
        dtype = getattr(torch, step.pop("dtype", "float32"))
        half = 2 if dtype != torch.float32 else 4
        predicted = estimate_step_memory(shape, weight_bytes_per_param=half, act_bytes=half, **step).tensor_peak
        modules = lora_modules(shape, step["target_modules"])
        n_lora = lora_param_count(shape, modules, step["lora_r"])
        tokens = step["micro_batch"] * step["seq_len"]
        pred_s = step_time(
            shape,
            cpu,
            n_lora=n_lora,
            n_adapters=len(modules),
            tokens=tokens,
            seq_len=step["seq_len"],
            gradient_checkpointing=step.get("gradient_checkpointing", False),
        ).seconds_per_step
        started = time.perf_counter()
        measured = measure_lora_step(make(), timed_steps=2, dtype=dtype, **step)
        mem_ratios.append(predicted / measured.peak_bytes)
        timing = f"{pred_s:11.3f} {measured.seconds_per_step:11.3f} {pred_s / measured.seconds_per_step:6.2f}"
        if dtype == torch.float32:
            time_ratios.append(pred_s / measured.seconds_per_step)
        else:  # CPUs run bfloat16 matmuls far below their float32 rate; lorakit trains in float32 there
            timing = f"{'-':>11} {measured.seconds_per_step:11.3f} {'-':>6}"
        print(
            f"{name:34} {fmt_bytes(predicted):>11} {fmt_bytes(measured.peak_bytes):>11} {mem_ratios[-1]:6.3f} | "
            f"{timing}   ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    worst = max(abs(r - 1) for r in mem_ratios)
    print(
        f"memory: worst error {worst:.1%} over {len(mem_ratios)} configurations; "
        f"time (float32 rows): predicted/measured from {min(time_ratios):.2f} to {max(time_ratios):.2f}"
    )


if __name__ == "__main__":
    main()
