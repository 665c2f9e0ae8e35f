"""How close `lorakit plan` is: predicted vs measured peak memory and time per step on this CPU.

Each configuration trains a random-init LoRA model (no weights downloaded) for a few real steps;
peak memory is the peak of live tensor bytes (lorakit.memory.TensorMemoryTracker), the same
quantity a CUDA allocator reports as max_memory_allocated. Time is the wall time of one untracked
step after warm-up; the CPU matmul rate behind the time prediction is measured in this run.

Issue 11's training is measured as training runs it: batches with shift_labels through
train.loss.causal_loss, with train.labelled_logits_only on (only answer positions reach the output
projection) and off (the model's own loss), and micro-batches packed by prompting.packing's
PackedCollator (passages: the questions on one passage share it once; examples). The packed rows
are SQuAD-shaped (random ids: a passage, several questions on it, short answers); the SmolLM2 rows
use the first micro-batch `lorakit plan` plans from the SQuAD part in ../shared/data when it and
the converted SmolLM2 tokenizer are there (the largest of its micro-batches, where the peak is).

    .venv/bin/python bench/bench_plan_accuracy.py            # tiny models + SmolLM2-135M size
    .venv/bin/python bench/bench_plan_accuracy.py --quick    # tiny models only
    .venv/bin/python bench/bench_plan_accuracy.py --threads 1  # on a CPU shared with other jobs
    .venv/bin/python bench/bench_plan_accuracy.py --issue11  # only the labelled-only and packed rows
    .venv/bin/python bench/bench_plan_accuracy.py --smollm2  # only those on SmolLM2 and SQuAD
    .venv/bin/python bench/bench_plan_accuracy.py --quant    # only the 4-bit / 8-bit (bitsandbytes) rows
"""

from __future__ import annotations

import random
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaConfig

from lorakit.plan.devices import GpuSpec, cpu_rates, step_time
from lorakit.plan.measure import measure_lora_step
from lorakit.plan.memory import estimate_step_memory, fmt_bytes, lora_modules, lora_param_count
from lorakit.plan.shape import read_model_shape
from lorakit.prompting.packing import PackedCollator, ShiftedLabelsCollator
from lorakit.train.loss import causal_loss

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

# --- issue 13: the seeds' QLoRA recipe (4-bit NF4 / 8-bit bitsandbytes layers, 8-bit AdamW) on the CPU
QLORA = dict(quantization="4bit", optimizer="paged_adamw_8bit")
QUANT = [
    (
        "tiny b4 s128 r8 all 4bit paged8",
        tiny(),
        dict(micro_batch=4, seq_len=128, lora_r=8, target_modules="all-linear", **QLORA),
    ),
    (
        "tiny b4 s128 r8 all 8bit paged8",
        tiny(),
        dict(
            micro_batch=4,
            seq_len=128,
            lora_r=8,
            target_modules="all-linear",
            quantization="8bit",
            optimizer="paged_adamw_8bit",
        ),
    ),
    (
        "small b4 s128 r16 all ckpt 4bit paged8",
        tiny(h=256, layers=4, inter=768, heads=8, kv=4, vocab=8000),
        dict(micro_batch=4, seq_len=128, lora_r=16, target_modules="all-linear", gradient_checkpointing=True, **QLORA),
    ),
    (
        "SmolLM2-135M b2 s256 r16 qv ckpt 4bit paged8",
        smollm2,
        dict(micro_batch=2, seq_len=256, lora_r=16, target_modules="auto", gradient_checkpointing=True, **QLORA),
    ),
    (
        "SmolLM2-135M b1 s256 r16 all 8bit adamw8",
        smollm2,
        dict(
            micro_batch=1,
            seq_len=256,
            lora_r=16,
            target_modules="all-linear",
            quantization="8bit",
            optimizer="adamw_8bit",
        ),
    ),
]


# --- issue 11: labelled-only logits and packed micro-batches ------------------------------------

IGNORE = -100
SQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad-v1.1-dev-part-a.json"


def squad_shaped(vocab: int, passages: int, questions: int, seed: int = 0) -> list[dict]:
    """Encoded features shaped like SQuAD's: a 120-260 token passage asked `questions` questions of
    10-20 tokens, answers of 2-8 tokens (labelled), random ids."""
    rng = random.Random(seed)
    features = []
    for _ in range(passages):
        passage = [rng.randrange(3, vocab) for _ in range(rng.randrange(120, 260))]
        for _ in range(questions):
            prompt = passage + [rng.randrange(3, vocab) for _ in range(rng.randrange(10, 20))]
            answer = [rng.randrange(3, vocab) for _ in range(rng.randrange(2, 8))]
            features.append({"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer})
    return features


def squad_micro_batch(micro_batch: int) -> list[dict] | None:
    """The largest micro-batch (packed by passages) of those `lorakit plan` plans from the SQuAD part
    (= training's, same seed), encoded with SmolLM2's tokenizer; None without the data or the model."""
    from lorakit.config_loading import validate_config
    from lorakit.demo.hubless import is_converted, model_dir
    from lorakit.plan.estimate import data_lengths
    from lorakit.prompting.packing import build_units, fill_rows, plan_micro_batches

    if not SQUAD.is_file() or not is_converted(model_dir()):
        return None
    config = validate_config(
        {
            "data": {"path": str(SQUAD), "format": "squad", "split_by": "group"},
            "model": {"name_or_path": str(model_dir())},
            "template": {"name": "context_qa", "max_length": 512},
            "train": {"micro_batch_size": micro_batch},
        }
    )
    features = data_lengths(config, "causal").features
    planned = plan_micro_batches(
        features,
        micro_batch_size=micro_batch,
        batch_tokens=micro_batch * 512,
        max_length=512,
        share=True,
        seed=config.train.seed,
    )

    def packed_size(batch: list[int]) -> int:
        rows = fill_rows(build_units([features[i] for i in batch], 512, True), 512)
        return len(rows) * max(sum(len(unit) for unit in row) for row in rows)

    return [features[i] for i in max(planned, key=packed_size)]


def batch_of(features: list[dict], packing: str) -> dict:
    """The micro-batch as training's collator builds it for train.packing=`packing`."""
    if packing == "off":
        return ShiftedLabelsCollator(0)(features)
    return PackedCollator(0, 512, packing == "passages")(features)


def loss_with(labelled_only: bool):
    return lambda model, batch: causal_loss(model, batch, labelled_logits_only=labelled_only)[0]


SMALL = tiny(h=256, layers=4, inter=768, heads=8, kv=4, vocab=32000)
# (name, model, step settings, features (a function of the vocabulary), packing, labelled_logits_only)
ISSUE11 = [
    ("small off  labelled-only off", SMALL, dict(lora_r=16), lambda v: squad_shaped(v, 2, 4), "off", False),
    ("small off  labelled-only on", SMALL, dict(lora_r=16), lambda v: squad_shaped(v, 2, 4), "off", True),
    ("small passages labelled-only on", SMALL, dict(lora_r=16), lambda v: squad_shaped(v, 2, 4), "passages", True),
    ("small examples labelled-only on", SMALL, dict(lora_r=16), lambda v: squad_shaped(v, 2, 4), "examples", True),
    (
        "tiny passages eager",
        tiny(vocab=8000),
        dict(lora_r=8, attn="eager"),
        lambda v: squad_shaped(v, 3, 5),
        "passages",
        True,
    ),
]
SMOLLM_ISSUE11 = [
    (f"SmolLM2 SQuAD {packing} labelled-only {'on' if on else 'off'}", smollm2, dict(lora_r=16), None, packing, on)
    for packing, on in (("off", False), ("off", True), ("passages", True), ("examples", True))
]


def main() -> None:
    quick = "--quick" in sys.argv
    only = {"--issue11", "--smollm2", "--quant"} & set(sys.argv)
    configs = [] if only else CONFIGS + ([] if quick else SMOLLM)
    if not only or "--quant" in only:  # the SmolLM2 k-bit rows are part of the full run, not of --quick
        configs += [c for c in QUANT if not (quick and c[1] is smollm2)]
    if "--threads" in sys.argv:  # e.g. 1 on a machine shared with other jobs, where threads fight
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    rate, op_seconds = cpu_rates(use_cache=False)
    cpu = GpuSpec("cpu", 0, rate, False, "this CPU", op_seconds)
    print(
        f"CPU measured now with {torch.get_num_threads()} thread(s): float32 matmul {rate / 1e9:.1f} GFLOP/s, "
        f"{op_seconds * 1e6:.0f} us per training-step operator"
    )
    header = f"{'configuration':52} {'predicted':>11} {'measured':>11} {'ratio':>6} | {'pred s/step':>11} {'meas s/step':>11} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    mem_ratios, time_ratios = [], []

    def row(name, make, step, *, dtype=torch.float32, predict=None, measure=None) -> None:
        started = time.perf_counter()
        shape = read_model_shape(make())
        half = 2 if dtype != torch.float32 else 4
        kw = {"labelled_logits_only": False, **(predict or {})}  # the model's own loss unless told
        predicted = estimate_step_memory(shape, weight_bytes_per_param=half, act_bytes=half, **step, **kw).tensor_peak
        modules = lora_modules(shape, step["target_modules"])
        pred_s = step_time(
            shape,
            cpu,
            n_lora=lora_param_count(shape, modules, step["lora_r"]),
            n_adapters=len(modules),
            tokens=step["micro_batch"] * step["seq_len"],
            seq_len=step["seq_len"],
            gradient_checkpointing=step.get("gradient_checkpointing", False),
            labelled_tokens=kw.get("labelled_tokens") if kw["labelled_logits_only"] else None,
            quantization=step.get("quantization", "none"),
        ).seconds_per_step
        measured = measure_lora_step(make(), timed_steps=2, dtype=dtype, **step, **(measure or {}))
        mem_ratios.append(predicted / measured.peak_bytes)
        timing = f"{pred_s:11.3f} {measured.seconds_per_step:11.3f} {pred_s / measured.seconds_per_step:6.2f}"
        if dtype == torch.float32:
            time_ratios.append(pred_s / measured.seconds_per_step)
        else:  # CPUs run bfloat16 matmuls far below their float32 rate; lorakit trains in float32 there
            timing = f"{'-':>11} {measured.seconds_per_step:11.3f} {'-':>6}"
        print(
            f"{name:52} {fmt_bytes(predicted):>11} {fmt_bytes(measured.peak_bytes):>11} {mem_ratios[-1]:6.3f} | "
            f"{timing}   ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )

    for name, make, step in configs:
        step = dict(step)
        row(name, make, step, dtype=getattr(torch, step.pop("dtype", "float32")))

    rows = (
        []
        if "--quant" in sys.argv
        else ([] if "--smollm2" in sys.argv else ISSUE11) + ([] if quick else SMOLLM_ISSUE11)
    )
    squad = None if quick else squad_micro_batch(4)
    for name, make, settings, features_for, packing, labelled_only in rows:
        features = features_for(make().vocab_size) if features_for else squad
        if features is None:
            print(f"{name:52} skipped: needs {SQUAD} and the converted SmolLM2 (lorakit demo)")
            continue
        batch = batch_of(features, packing)
        rows_, width = batch["input_ids"].shape
        labelled = int((batch["shift_labels"] != IGNORE).sum())
        step = dict(micro_batch=rows_, seq_len=width, target_modules="all-linear", **settings)
        predict = dict(labelled_logits_only=labelled_only, labelled_tokens=labelled, packed=packing != "off")
        label = f"{name} ({rows_}x{width}, {labelled} lab.)"
        row(label, make, step, predict=predict, measure=dict(batch=batch, loss_fn=loss_with(labelled_only)))

    worst = max(abs(r - 1) for r in mem_ratios)
    print(
        f"memory: worst error {worst:.1%} over {len(mem_ratios)} configurations; "
        f"time (float32 rows): predicted/measured from {min(time_ratios):.2f} to {max(time_ratios):.2f}"
    )


if __name__ == "__main__":
    main()
