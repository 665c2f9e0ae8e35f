"""The seeds' QLoRA recipe against 32-bit LoRA, SmolLM2-135M-Instruct on SQuAD, on this CPU.

Both runs train on the same first N questions of ../shared/data/squad-v1.1-dev-part-a.json with the
same LoRA (r=16 on q_proj/v_proj), steps and seed (bench/squad_smollm2.py's config), then answer
the same held-out questions (articles never trained on):

    32-bit LoRA   float32 base, adamw_torch
    4-bit QLoRA   NF4 + double quantization, float32 compute, paged_adamw_8bit, gradient checkpointing

Each run trains in a child process of its own, so its peak resident memory (ru_maxrss, read when
training ends) is its own: weights, activations, optimizer states and the ~0.6 GiB that Python,
torch and transformers take, and whatever pages of the safetensors file loading left resident; the
base model's tensor bytes once loaded are printed beside it.
Printed: peak RSS, the model's tensor bytes, useful training tokens/s (unpacked tokens / wall
time) and held-out EM/F1 of both, and the base model's.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python bench/bench_qlora.py [--train 160] [--test 50]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from squad_smollm2 import DATA, bench_config, token_stats, write_subsets  # noqa: E402

RECIPES = {
    "lora32": {"label": "32-bit LoRA", "model": {}, "train": {}},
    "qlora": {
        "label": "4-bit QLoRA",
        "model": {"quantization": "4bit"},
        "train": {"optimizer": "paged_adamw_8bit", "gradient_checkpointing": True},
    },
}


def model_bytes(config) -> int:
    """Bytes of every tensor the base model holds once loaded for training (k-bit states included)."""
    from lorakit.models.loading import load_base_model
    from lorakit.plan.measure import _quant_state_tensors

    model = load_base_model(config.model, "causal", training=True)
    tensors = [*model.parameters(), *model.buffers(), *_quant_state_tensors(model)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def child(recipe: str, out: Path, train_path: Path, test_path: Path, compare_base: bool) -> None:
    """Train one recipe, then evaluate it on the held-out questions; write result.json."""
    from lorakit.demo.hubless import ensure_smollm2
    from lorakit.evaluate.runner import evaluate_path
    from lorakit.train.recipe import train

    config = bench_config(ensure_smollm2(), train_path, test_path, out / recipe, 1.0)
    for section, values in RECIPES[recipe].items():
        if section != "label":
            for key, value in values.items():
                setattr(getattr(config, section), key, value)
    config.train.run_name = recipe
    tokens = token_stats(config)["tokens"]
    started = time.perf_counter()
    paths = train(config)
    train_s = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    weights = model_bytes(config)
    started = time.perf_counter()
    summary = evaluate_path(paths.root, split="test", compare_base=compare_base, verbose=False)
    result = {
        "train_s": train_s,
        "tokens_per_s": tokens / train_s,
        "peak_rss": peak_rss,
        "weights": weights,
        "eval_s": time.perf_counter() - started,
        "n": summary["n"],
        "adapter": {k: summary["adapter"][k] for k in ("exact_match", "f1")},
        "base": {k: summary["base"][k] for k in ("exact_match", "f1")} if compare_base else None,
    }
    (out / f"{recipe}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-qlora"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    if args.child:
        train_path, test_path = out / "data" / "squad-train.json", out / "data" / "squad-test.json"
        child(args.child, out, train_path, test_path, compare_base=args.child == "lora32")
        return 0
    if not DATA.is_file():
        print(f"skipped: {DATA} is absent (this benchmark reads the shared SQuAD v1.1 dev part A).")
        return 0
    started = time.perf_counter()
    write_subsets(args.train, args.test, out / "data")
    results = {}
    for recipe in RECIPES:
        command = [sys.executable, __file__, "--child", recipe, "--out", str(out)]
        code = subprocess.call(command)
        if code != 0:
            print(f"{recipe}: the child exited {code}")
            return 1
        results[recipe] = json.loads((out / f"{recipe}.json").read_text(encoding="utf-8"))
    lora, qlora = results["lora32"], results["qlora"]
    gib = 2**30
    print(f"\nSmolLM2-135M-Instruct, SQuAD v1.1 dev part A: {args.train} training questions (1 epoch), ")
    print(f"{lora['n']} held-out questions from articles never trained on; this CPU, one process per run\n")
    print(f"{'':34s} {'32-bit LoRA':>12s} {'4-bit QLoRA':>12s} {'QLoRA / LoRA':>13s}")
    rows = [
        ("peak resident memory, GiB", lora["peak_rss"] / gib, qlora["peak_rss"] / gib, "{:.2f}"),
        ("base model tensors in memory, MiB", lora["weights"] / 2**20, qlora["weights"] / 2**20, "{:.0f}"),
        ("training tokens/s", lora["tokens_per_s"], qlora["tokens_per_s"], "{:.0f}"),
        ("training time, min", lora["train_s"] / 60, qlora["train_s"] / 60, "{:.1f}"),
        ("held-out EM after", lora["adapter"]["exact_match"], qlora["adapter"]["exact_match"], "{:.1f}"),
        ("held-out F1 after", lora["adapter"]["f1"], qlora["adapter"]["f1"], "{:.1f}"),
    ]
    for label, a, b, fmt in rows:
        ratio = f"{b / a:.2f}" if a else "-"
        print(f"{label:34s} {fmt.format(a):>12s} {fmt.format(b):>12s} {ratio:>13s}")
    base = lora["base"]
    print(f"base model (no adapter, float32): EM {base['exact_match']:.1f}, F1 {base['f1']:.1f}")
    print(f"total wall time {(time.perf_counter() - started) / 60:.1f} min")
    (out / "bench_qlora.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
