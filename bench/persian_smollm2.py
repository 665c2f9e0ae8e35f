"""PersianQA with SmolLM2-135M-Instruct on the CPU: the SQuAD recipe on Persian, before and after.

Trains on the PersianQA part in ../shared/data/ (SQuAD 2.0-style JSON: unanswerable questions are
taught to answer data.no_answer, in Persian) with the recipe of docs/recipes.md (lorakit's learning
rate and LoRA target defaults; the bench's SQuAD template, system prompt and batch settings), split by
article so no test passage is trained on, and scores the held-out questions before and after: EM /
F1 under Persian normalization, with the answerable and unanswerable questions apart.

    .venv/bin/python bench/persian_smollm2.py [--epochs 1] [--test-share 0.2] [--out runs/persian]
        [--set KEY=VALUE ...]

SmolLM2 was trained almost only on English; its byte-level tokenizer spells a Persian word in
several tokens, so passages are long and the model starts from nearly nothing in this language.
The numbers say what a small English model can learn here, not what lorakit can do with a
multilingual one (examples/persian_qa.yaml: Qwen2.5-3B). Skips with a message without the data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from squad_smollm2 import with_overrides  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "persianqa-test-part-a.json"
NO_ANSWER = "پاسخی وجود ندارد"  # "there is no answer", as examples/persian_qa.yaml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--test-share", type=float, default=0.2)
    parser.add_argument("--out", default=str(ROOT / "runs" / "persian"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} is absent (this benchmark reads the shared PersianQA part).")
        return 0

    from lorakit.demo.hubless import ensure_smollm2
    from lorakit.evaluate.runner import evaluate_path
    from lorakit.train.recipe import train

    out = Path(args.out)
    tree = {
        "data": {
            "path": str(DATA),
            "format": "squad",
            "no_answer": NO_ANSWER,
            "split_by": "group",
            "split": {"train": 1 - args.test_share, "validation": 0.0, "test": args.test_share},
        },
        "model": {"name_or_path": str(ensure_smollm2()), "precision": "float32"},
        "template": {
            "name": "chat",
            "max_length": 1536,  # Persian passages take ~1,100 tokens here: none is shortened
            "system_prompt": (
                "Answer the question with the shortest exact phrase copied from the context. "
                f"If the context does not answer it, reply {NO_ANSWER}."
            ),
        },
        "train": {
            "output_dir": str(out),
            "run_name": "persian-smollm2",
            "epochs": args.epochs,
            "micro_batch_size": 8,
            "logging_steps": 10,
            "best_metric": None,
            "save_total_limit": 1,
            "overwrite": True,
        },
        "eval": {"max_new_tokens": 48, "batch_size": 16, "bleu_tokenize": "intl"},
    }
    config = with_overrides(tree, args.set)

    started = time.perf_counter()
    paths = train(config)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    summary = evaluate_path(paths.root, split="test", compare_base=True, perplexity=False, verbose=False)
    eval_s = time.perf_counter() - started

    print(f"\nPersianQA (test part A), SmolLM2-135M-Instruct, {summary['n']} held-out questions, CPU float32")
    print(f"{'':28s} {'base':>16s} {'after':>16s}")
    for label, key in (("all", None), ("answerable", "has_answer"), ("unanswerable", "no_answer")):
        cells = []
        for side in ("base", "adapter"):
            scores = summary[side] if key is None else summary[side].get(key)
            cells.append(
                f"{scores['exact_match']:.1f} / {scores['f1']:.1f} (n={scores.get('n', summary['n'])})"
                if scores
                else "-"
            )
        print(f"{label + ', EM / F1':28s} {cells[0]:>16s} {cells[1]:>16s}")
    print(
        f"never stops: base {summary['base']['never_stops_rate']:.1f}%, after {summary['adapter']['never_stops_rate']:.1f}%"
    )
    print(
        f"training {train_s / 60:.1f} min, evaluation (base + after) {eval_s / 60:.1f} min; report: {summary['folder']}"
    )
    row = {"n": summary["n"], "base": summary["base"], "adapter": summary["adapter"], "train_min": train_s / 60}
    (out / "persian_result.json").write_text(json.dumps(row | {"eval_min": eval_s / 60, "set": args.set}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
