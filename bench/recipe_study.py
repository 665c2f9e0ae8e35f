"""One row of the QA recipe study (docs/recipes.md): train on the SQuAD bench split, score on validation.

Same 1,000 training questions as bench/squad_smollm2.py (its bench_config is the starting point);
the score comes from VALIDATION questions: questions of the held-out articles that are not among
squad_smollm2's 300 test questions, so a recipe is never chosen on the test questions. Each row
appends one JSON line (the overrides, EM/F1, never-stops, train and eval wall time) to --log.

    .venv/bin/python bench/recipe_study.py --name lr1e-3 --set train.learning_rate=1e-3 [--set ...]
        [--validation 200] [--epochs 1] [--log bench/results/recipe_study.jsonl] [--test]

--test also scores the 300 test questions (for the chosen recipe only, once it is chosen);
--train-only scores nothing, to time a training on all cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from squad_smollm2 import DATA, ROOT, as_articles, bench_config, with_overrides, write_subsets  # noqa: E402


def write_validation(test_path: Path, n: int, out: Path) -> Path:
    """n questions spread evenly over the held-out articles, none of them a test question."""
    squad = json.loads(DATA.read_text(encoding="utf-8"))
    test = json.loads(test_path.read_text(encoding="utf-8"))
    test_ids = {qa["id"] for a in test["data"] for p in a["paragraphs"] for qa in p["qas"]}
    train = json.loads((test_path.parent / "squad-train.json").read_text(encoding="utf-8"))
    used = {a["title"] for a in train["data"]}
    pool = [
        (a["title"], p["context"], qa)
        for a in squad["data"]
        if a["title"] not in used
        for p in a["paragraphs"]
        for qa in p["qas"]
        if qa["id"] not in test_ids
    ]
    step = max(1, len(pool) // n)
    path = out / "squad-validation.json"
    articles = as_articles(pool[step // 2 :: step][:n])
    path.write_text(json.dumps({"version": "1.1", "data": articles}), encoding="utf-8")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--test", action="store_true", help="also score the 300 test questions")
    parser.add_argument(
        "--train-only", action="store_true", help="time the training and score nothing (e.g. on all cores)"
    )
    parser.add_argument("--log", default=str(ROOT / "bench" / "results" / "recipe_study.jsonl"))
    parser.add_argument("--out", default=None, help="run folder parent (default: runs/study/<name>)")
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} is absent.")
        return 0

    import torch

    from lorakit.demo.hubless import ensure_smollm2
    from lorakit.evaluate.runner import evaluate_path
    from lorakit.train.recipe import train

    out = Path(args.out or ROOT / "runs" / "study" / args.name)
    train_path, test_path = write_subsets(1000, 300, out / "data")
    val_path = write_validation(test_path, args.validation, out / "data")
    tree = bench_config(ensure_smollm2(), train_path, test_path, out, args.epochs).model_dump(mode="json")
    config = with_overrides(tree, args.set)

    started = time.perf_counter()
    paths = train(config)
    train_s = time.perf_counter() - started
    row: dict = {"name": args.name, "set": args.set, "epochs": args.epochs, "train_min": round(train_s / 60, 2)}
    row["threads"] = torch.get_num_threads()
    splits = [] if args.train_only else [("validation", str(val_path))] + ([("test", None)] if args.test else [])
    for label, data in splits:
        started = time.perf_counter()
        summary = evaluate_path(paths.root, data=data, split="test", perplexity=False, verbose=False)
        adapter = summary["adapter"]
        row[label] = {
            "n": summary["n"],
            "em": round(adapter["exact_match"], 2),
            "f1": round(adapter["f1"], 2),
            "never_stops": round(adapter["never_stops_rate"], 2),
            "eval_s": round(time.perf_counter() - started, 1),
        }
    print(json.dumps(row), flush=True)
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
