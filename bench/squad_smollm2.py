"""SQuAD v1.1 with SmolLM2-135M-Instruct on the CPU: lorakit's defaults against the field's notebook.

Fine-tunes on the first 1,000 questions of ../shared/data/squad-v1.1-dev-part-a.json and evaluates
on 300 questions of articles never trained on (split by article), before and after, in one run.
Prints EM/F1, the never-stops rate, useful training tokens/s, the share of supervised tokens that
are answer tokens, and wall times, next to the baseline measured for the same work
(shared/data/README.md, "The bar to clear").

    .venv/bin/python bench/squad_smollm2.py [--recipe study|previous] [--train 1000] [--test 300]
        [--epochs N] [--out runs/bench] [--set KEY=VALUE ...] [--rows lorakit,trl] [--trl-python PATH]

Takes 20-40 minutes on a 2-core CPU. Skips with a message when the data file is absent.

--rows trl adds TRL's SFTTrainer (bench/trl_squad.py, run by --trl-python, an environment of its
own) trained on the same questions rendered with the same template, its answers scored by the
same metrics. Each row's result is kept in OUT/rows/<row>.json; every row found there for the
same split is printed, so rows can run as separate processes (one per core) and meet in one table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "squad-v1.1-dev-part-a.json"

# The notebook pipeline (Trainer + peft LoRA r=16 q/v, padding to 512, loss on the whole text,
# pad = eos), same model, same 1,000 training / 300 held-out questions, same CPU.
BASELINE = {
    "before_em": 0.0,
    "before_f1": 14.6,
    "after_em": 33.0,
    "after_f1": 47.1,
    "never_stops": 98.7,
    "train_min": 52.0,
    "eval_s_per_question": 2.6,
    "useful_tokens_per_s": 62.0,
    "answer_token_share": 2.0,
}


def as_articles(questions: list[tuple[str, str, dict]]) -> list[dict]:
    """(title, context, qa) triples, in order, as official SQuAD articles and paragraphs."""
    articles: dict[str, dict] = {}
    for title, context, qa in questions:
        article = articles.setdefault(title, {"title": title, "paragraphs": []})
        if not article["paragraphs"] or article["paragraphs"][-1]["context"] != context:
            article["paragraphs"].append({"context": context, "qas": []})
        article["paragraphs"][-1]["qas"].append(qa)
    return list(articles.values())


def write_subsets(n_train: int, n_test: int, out: Path) -> tuple[Path, Path]:
    """Train = the first n_train questions in file order; test = n_test questions spread evenly
    over the articles that contributed no training question. Both as official SQuAD JSON."""
    squad = json.loads(DATA.read_text(encoding="utf-8"))
    train_articles, count = [], 0
    for article in squad["data"]:
        if count >= n_train:
            break
        kept = {"title": article["title"], "paragraphs": []}
        for paragraph in article["paragraphs"]:
            qas = paragraph["qas"][: n_train - count]
            if qas:
                kept["paragraphs"].append({"context": paragraph["context"], "qas": qas})
                count += len(qas)
        train_articles.append(kept)
    used = {a["title"] for a in train_articles}
    held = [a for a in squad["data"] if a["title"] not in used]
    pool = [(a["title"], p["context"], qa) for a in held for p in a["paragraphs"] for qa in p["qas"]]
    step = max(1, len(pool) // n_test)
    chosen = pool[::step][:n_test]
    test_articles = as_articles(chosen)
    out.mkdir(parents=True, exist_ok=True)
    train_path, test_path = out / "squad-train.json", out / "squad-test.json"
    for path, articles in ((train_path, train_articles), (test_path, test_articles)):
        path.write_text(json.dumps({"version": "1.1", "data": articles}), encoding="utf-8")
    print(
        f"train: {count} questions from {len(train_articles)} articles; "
        f"test: {len(chosen)} questions from {len(test_articles)} held-out articles",
        flush=True,
    )
    return train_path, test_path


def bench_config(model_dir: Path, train_path: Path, test_path: Path, out: Path, epochs: float):
    from lorakit.config import LorakitConfig

    return LorakitConfig.model_validate(
        {
            "data": {
                "path": str(train_path),
                "test_path": str(test_path),
                "format": "squad",
                "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
            },
            "model": {"name_or_path": str(model_dir), "precision": "float32"},
            # lorakit's defaults otherwise: completion-only loss, EOS labelled, dynamic padding with
            # length-grouped batches. Same LoRA as the baseline (r=16 on q_proj/v_proj).
            "template": {
                "name": "chat",
                "max_length": 512,
                "system_prompt": (
                    "Answer the question with the shortest exact phrase copied from the context. "
                    "Do not write a full sentence."
                ),
            },
            "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
            "train": {
                "output_dir": str(out),
                "run_name": "squad-smollm2",
                "epochs": epochs,
                "micro_batch_size": 8,
                "learning_rate": 3e-4,
                "logging_steps": 10,
                "best_metric": None,
                "save_total_limit": 1,
                "overwrite": True,
            },
            "eval": {"max_new_tokens": 32, "batch_size": 16},
        }
    )


# The QA recipe chosen on validation articles (docs/recipes.md; bench/recipe_study.py), as overrides
# of bench_config, which pins lorakit's previous defaults for this bench (`--recipe previous`): the
# study recipe is lorakit's current defaults (learning_rate auto, all-linear) for 2 epochs.
RECIPES: dict[str, list[str]] = {
    "previous": [],
    "study": ["train.learning_rate=auto", "lora.target_modules=all-linear"],
}
RECIPE_EPOCHS = {"previous": 1.0, "study": 2.0}


def with_overrides(tree: dict, overrides: list[str]):
    """A validated config from a config tree and `--set KEY=VALUE` overrides, as `lorakit train --set`."""
    from lorakit.config_loading import _set_dotted, parse_overrides, validate_config

    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    return validate_config(tree, "--set")


def token_stats(config) -> dict:
    """What the training features supervise, encoded exactly as train() encodes them."""
    from lorakit.pipeline import prepare

    prepared = prepare(config)  # the task type is detected, as train() does
    features, stats, tokenizer = prepared.train_features, prepared.train_stats, prepared.tokenizer
    labels = [t for f in features for t in f["labels"] if t != -100]
    answer = sum(1 for t in labels if t != tokenizer.eos_token_id)
    return {
        "tokens": stats.n_total_tokens,
        "answer_share": 100 * answer / len(labels),
        "supervised_share": 100 * len(labels) / stats.n_total_tokens,
    }


def write_trl_inputs(config, folder: Path) -> tuple[Path, Path, list]:
    """The training questions as TRL prompt-completion text (lorakit's rendering of each prompt,
    the answer as completion: the text lorakit trains on) and the test prompts, rendered the same way."""
    from lorakit.pipeline import prepare
    from lorakit.prompting.encoding import encode_prompt

    prepared = prepare(config)
    tokenizer, pairs = prepared.tokenizer, []
    for feature in prepared.train_features:
        ids, labels = feature["input_ids"], feature["labels"]
        first = next(i for i, label in enumerate(labels) if label != -100)
        answer = [t for t in ids[first:] if t != tokenizer.eos_token_id]  # TRL appends its own EOS
        pairs.append({"prompt": tokenizer.decode(ids[:first]), "completion": tokenizer.decode(answer)})
    test = prepared.splits.test
    prompts = [
        {
            "id": ex.id,
            "prompt": tokenizer.decode(encode_prompt(prepared.template, tokenizer, ex.prompt_messages(), ex.context)),
        }
        for ex in test
    ]
    folder.mkdir(parents=True, exist_ok=True)
    pairs_path, prompts_path = folder / "pairs.jsonl", folder / "prompts.jsonl"
    pairs_path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    prompts_path.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    return pairs_path, prompts_path, test


def trl_row(python: str, config, model_dir: Path, out: Path) -> dict:
    """Train and answer with TRL in its own environment; score its answers as lorakit's are scored."""
    import subprocess

    from lorakit.evaluate.answers import extract_answer
    from lorakit.evaluate.metrics import corpus_metrics

    folder = out / "trl"
    pairs, prompts, test = write_trl_inputs(config, folder)
    script = Path(__file__).resolve().parent / "trl_squad.py"
    command = [python, str(script), "--model", str(model_dir), "--pairs", str(pairs), "--prompts", str(prompts)]
    subprocess.run(command + ["--out", str(folder), "--epochs", str(config.train.epochs)], check=True)
    row = json.loads((folder / "trl_row.json").read_text())
    answers = {p["id"]: p for p in map(json.loads, (folder / "predictions.jsonl").read_text().splitlines())}
    generated = [answers[ex.id] for ex in test]
    scores = corpus_metrics(
        [extract_answer(g["text"]) for g in generated],
        [ex.answers for ex in test],
        finish_reasons=["stop" if g["stopped"] else "length" for g in generated],
    )
    return {
        "after_em": scores["exact_match"],
        "after_f1": scores["f1"],
        "never_stops": scores["never_stops_rate"],
        "train_min": row["train_s"] / 60,
        "eval_s_per_question": row["eval_s"] / len(test),
        "settings": row["settings"],
        "versions": row["versions"],
    }


def lorakit_row(config) -> dict:
    """Train with lorakit, then evaluate base and adapter on the test questions."""
    from lorakit.evaluate.runner import evaluate_path
    from lorakit.train.recipe import train

    tokens = token_stats(config)
    phase = time.perf_counter()
    paths = train(config)
    train_s = time.perf_counter() - phase
    # the work done, counted as unpacked tokens: with packing a shared passage is computed once,
    # and the Trainer's tokens_seen counts only what was computed
    seen = tokens["tokens"] * config.train.epochs
    phase = time.perf_counter()
    # no perplexity pass: it doubles the evaluation time and no row of the table reads it
    summary = evaluate_path(paths.root, split="test", compare_base=True, perplexity=False, verbose=False)
    eval_s = time.perf_counter() - phase
    before, after, n = summary["base"], summary["adapter"], summary["n"]
    print(f"report: {Path(summary['folder']) / 'report.md'}", flush=True)
    return {
        "before_em": before["exact_match"],
        "before_f1": before["f1"],
        "after_em": after["exact_match"],
        "after_f1": after["f1"],
        "never_stops": after["never_stops_rate"],
        "train_min": train_s / 60,
        "eval_s_per_question": eval_s / (2 * n),  # two passes: base, then adapter
        "useful_tokens_per_s": seen / train_s,
        "answer_token_share": tokens["answer_share"],
        "supervised_share": tokens["supervised_share"],
    }


TABLE = [
    ("EM before", "before_em", "{:.1f}"),
    ("F1 before", "before_f1", "{:.1f}"),
    ("EM after", "after_em", "{:.1f}"),
    ("F1 after", "after_f1", "{:.1f}"),
    ("never emit EOS (after), %", "never_stops", "{:.1f}"),
    ("training time, min", "train_min", "{:.1f}"),
    ("eval, s per question", "eval_s_per_question", "{:.2f}"),
    ("useful training tokens/s", "useful_tokens_per_s", "{:.0f}"),
    ("supervised tokens that are answer tokens, %", "answer_token_share", "{:.1f}"),
]


def print_table(rows: dict[str, dict], n: int) -> None:
    columns = {"notebook (recorded)": BASELINE} | rows
    print(f"\nSQuAD v1.1 (dev part A), SmolLM2-135M-Instruct, {n} held-out questions, CPU float32")
    print(f"{'':44s}" + "".join(f" {name:>20s}" for name in columns))
    for label, key, fmt in TABLE:
        cells = [fmt.format(c[key]) if c.get(key) is not None else "-" for c in columns.values()]
        print(f"{label:44s}" + "".join(f" {cell:>20s}" for cell in cells))
    for name, row in rows.items():
        if "settings" in row:
            print(f"{name}: {row['settings']}; {row.get('versions', '')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--epochs", type=float, default=None, help="default: the recipe's (study 2, previous 1)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="study",
        help="study: the recipe of docs/recipes.md (default); previous: lorakit's earlier defaults",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, as `lorakit train --set` (e.g. train.packing=off)",
    )
    parser.add_argument("--rows", default="lorakit", help="comma-separated: lorakit, trl")
    parser.add_argument("--trl-python", default=None, help="the python of TRL's environment (for --rows trl)")
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} is absent (this benchmark reads the shared SQuAD v1.1 dev part A).")
        return 0
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    if "trl" in wanted and not (args.trl_python and Path(args.trl_python).is_file()):
        print("skipped the trl row: pass --trl-python PATH (see bench/trl_squad.py for its environment)")
        wanted.remove("trl")

    from lorakit.demo.hubless import ensure_smollm2

    out = Path(args.out)
    started = time.perf_counter()
    model_dir = ensure_smollm2()
    train_path, test_path = write_subsets(args.train, args.test, out / "data")
    split_id = hashlib.sha256(train_path.read_bytes() + test_path.read_bytes()).hexdigest()[:16]
    epochs = args.epochs if args.epochs is not None else RECIPE_EPOCHS[args.recipe]
    config = bench_config(model_dir, train_path, test_path, out, epochs)
    overrides = RECIPES[args.recipe] + args.set
    if overrides:
        config = with_overrides(config.model_dump(mode="json"), overrides)

    folder = out / "rows"
    folder.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        label = f"lorakit {args.recipe}" if name == "lorakit" else "TRL SFTTrainer"
        print(f"\n== {label} ==", flush=True)
        row = lorakit_row(config) if name == "lorakit" else trl_row(args.trl_python, config, model_dir, out)
        row |= {"split": split_id, "overrides": overrides, "epochs": epochs}
        (folder / f"{label.replace(' ', '-')}.json").write_text(json.dumps(row, indent=2))

    rows = {}
    for path in sorted(folder.glob("*.json")):
        row = json.loads(path.read_text())
        if row.get("split") == split_id:
            rows[path.stem.replace("-", " ")] = row
    print_table(rows, args.test)
    print(f"total wall time {(time.perf_counter() - started) / 60:.1f} min; rows kept in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
