"""GPU check (CUDA only, not part of CI): QLoRA vs 16-bit LoRA on SmolLM2-135M-Instruct.

Trains the same data for a few dozen steps twice, once with 4-bit NF4 quantization (QLoRA) and
once with 16-bit weights (bf16 where supported, else fp16 with float32 master weights), and
prints tokens/s, peak allocated GPU memory and the final loss of each, plus their ratios.

    python bench/gpu_check.py [--model FOLDER] [--steps 40] [--data ../shared/data/squad-v1.1-dev-part-a.json]

--model defaults to the converted SmolLM2 folder in the lorakit cache (`lorakit demo` makes it;
copy it to the GPU machine when that machine has no registry access).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def run_once(model: str, data: str, quantization: str, steps: int, out: Path) -> dict:
    import torch

    from lorakit.config_loading import validate_config
    from lorakit.runs import read_metrics
    from lorakit.train.recipe import train

    config = validate_config(
        {
            "data": {"path": data, "max_records": 2000, "split": {"train": 0.95, "validation": 0.0, "test": 0.05}},
            "model": {"name_or_path": model, "quantization": quantization},
            "template": {"name": "context_qa", "max_length": 512},
            "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
            "train": {
                "output_dir": str(out),
                "run_name": f"gpu-{quantization}",
                "max_steps": steps,
                "micro_batch_size": 8,
                "logging_steps": 5,
                "save_every": 10_000,
                "overwrite": True,
                "optimizer": "paged_adamw_8bit" if quantization == "4bit" else "adamw_torch",
            },
        }
    )
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    paths = train(config)
    seconds = time.perf_counter() - start
    lines = read_metrics(paths.metrics)
    tokens = max((line.get("tokens_seen", 0) for line in lines), default=0)
    losses = [line["loss"] for line in lines if "loss" in line]
    precision = json.loads((paths.adapter / "lorakit.json").read_text())["precision"]
    return {
        "quantization": quantization,
        "precision": precision,
        "tokens_per_second": tokens / seconds if seconds else 0.0,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "final_loss": losses[-1] if losses else float("nan"),
        "seconds": seconds,
    }


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/squad-v1.1-dev-part-a.json")
    )
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run it on a GPU machine.")
        return 0
    if not Path(args.data).exists():
        print(f"gpu_check: data file {args.data} not found; pass --data")
        return 1
    model = args.model
    if model is None:
        from lorakit.demo.hubless import ensure_smollm2

        model = str(ensure_smollm2())
    print(f"device: {torch.cuda.get_device_name()}  model: {model}")
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_once(model, args.data, q, args.steps, Path(tmp)) for q in ("none", "4bit")]
    print(f"{'run':<10}{'precision':<12}{'tokens/s':>10}{'peak GiB':>10}{'loss':>8}{'seconds':>9}")
    for r in results:
        name = "QLoRA" if r["quantization"] == "4bit" else "16-bit"
        print(
            f"{name:<10}{r['precision']:<12}{r['tokens_per_second']:>10.0f}{r['peak_gib']:>10.2f}{r['final_loss']:>8.3f}{r['seconds']:>9.1f}"
        )
    full, qlora = results
    print(
        f"QLoRA / 16-bit: speed x{qlora['tokens_per_second'] / full['tokens_per_second']:.2f}, "
        f"peak memory x{qlora['peak_gib'] / full['peak_gib']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
