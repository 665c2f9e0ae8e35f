"""End to end: a run trained by lorakit, evaluated on its own held-out split (with the base model
compared), reports whose numbers are the predictions' numbers, merged folders, and scoring
predictions made elsewhere in both file formats."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path

import pytest

from lorakit.config_loading import validate_config
from lorakit.data import load_splits
from lorakit.errors import EvalError
from lorakit.evaluate.runner import evaluate_path, score_predictions

pytestmark = pytest.mark.integration  # evaluates a run trained by the fixture

PAIRS = [
    ("What is the capital of France?", "Paris"),
    ("Who wrote the book?", "the author"),
    ("What color is the sky?", "blue"),
    ("How many legs has a dog?", "four"),
]


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory) -> Path:
    from lorakit.train.recipe import train

    tmp = tmp_path_factory.mktemp("eval")
    data = tmp / "qa.jsonl"
    rows = [{"id": f"q{i}", "question": f"{q} ({i})", "answer": a} for i, (q, a) in enumerate(PAIRS * 4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = validate_config(
        {
            "data": {
                "path": str(data),
                "split": {"train": 0.75, "validation": 0.0, "test": 0.25},
                "split_by": "record",
            },
            "model": {"name_or_path": str(tiny_llama_dir)},
            "template": {"name": "question_answer", "max_length": 64},
            # attention-only LoRA at the rate below: the learning these tests were measured on
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "auto"},
            "train": {
                "output_dir": str(tmp / "runs"),
                "run_name": "qa",
                "max_steps": 60,
                "micro_batch_size": 4,
                "learning_rate": 2e-2,
                "logging_steps": 4,
                "warmup_ratio": 0.0,
                "lr_scheduler": "constant",
            },
            "eval": {"max_new_tokens": 6, "batch_size": 3},
        }
    )
    return train(config).root


@pytest.fixture(scope="module")
def evaluated(trained) -> dict:
    return evaluate_path(trained, compare_base=True, verbose=False)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_writes_every_output(trained, evaluated):
    eval_dir = Path(evaluated["folder"])
    assert eval_dir.parent == trained / "eval" and eval_dir.name.startswith("test-")
    for name in ("predictions.jsonl", "metrics.json", "report.md", "report.html"):
        assert (eval_dir / name).is_file(), name
    written = json.loads((eval_dir / "metrics.json").read_text())
    assert written == {key: value for key, value in evaluated.items() if key != "folder"}
    assert written["evaluation"]["split"] == "test" and written["evaluation"]["data"] is None
    report = (eval_dir / "report.md").read_text()
    assert f"{evaluated['adapter']['f1']:.1f}" in report


def test_eval_uses_the_runs_own_held_out_split(trained, evaluated):
    from lorakit.run_metadata import read_run

    splits = load_splits(read_run(trained).config.data)
    ids = [line["id"] for line in _lines(Path(evaluated["folder"]) / "predictions.jsonl")]
    assert sorted(ids) == sorted(ex.id for ex in splits.test)
    assert not set(ids) & {ex.id for ex in splits.train}
    assert evaluated["n"] == len(splits.test) == 4


def _squad_em_f1(prediction: str, references: list[str]) -> tuple[float, float]:
    """EM and F1 (0..100) as SQuAD v1.1's evaluate script computes them, for English answers."""

    def tokens(text: str) -> list[str]:
        text = "".join(c for c in text.lower() if c not in string.punctuation)
        return re.sub(r"\b(a|an|the)\b", " ", text).split()

    def f1(pred: list[str], ref: list[str]) -> float:
        common = sum((Counter(pred) & Counter(ref)).values())
        return 0.0 if common == 0 else 2 * common / (len(pred) + len(ref))

    pred = tokens(prediction)
    return (100.0 * max(pred == tokens(r) for r in references), 100.0 * max(f1(pred, tokens(r)) for r in references))


def test_reported_numbers_are_the_predictions_numbers(trained, evaluated):
    lines = _lines(Path(evaluated["folder"]) / "predictions.jsonl")
    for prefix, key in (("", "adapter"), ("base_", "base")):
        for line in lines:
            # SQuAD's official rules, written out here rather than taken from lorakit.evaluate.metrics
            exact, f1 = _squad_em_f1(line[f"{prefix}prediction"], line["references"])
            assert line[f"{prefix}exact_match"] == exact
            assert line[f"{prefix}f1"] == pytest.approx(f1)
        # 60 steps: the adapter answers every test question (100) and the base none (0), so a wrong
        # scorer or a swapped column shows here; 12 steps gave 0 everywhere and checked nothing, and
        # 40 steps were enough unpacked but not with the default packing's fixed micro-batches
        # (loss 0.13 at step 40, 0.011 at step 60)
        assert {line[f"{prefix}f1"] for line in lines} == ({100.0} if key == "adapter" else {0.0})
        for metric in ("exact_match", "f1"):
            mean = sum(line[f"{prefix}{metric}"] for line in lines) / len(lines)
            assert evaluated[key][metric] == pytest.approx(mean)
        reasons = [line[f"{prefix}finish_reason"] for line in lines]
        assert evaluated[key]["never_stops_rate"] == pytest.approx(100 * reasons.count("length") / len(reasons))
        assert evaluated[key]["perplexity"] > 1
    # the fine-tuned adapter and the base model really are different models here
    assert [line["prediction"] for line in lines] != [line["base_prediction"] for line in lines]
    assert evaluated["adapter"]["perplexity"] < evaluated["base"]["perplexity"]
    assert evaluated["delta"]["f1"] == pytest.approx(evaluated["adapter"]["f1"] - evaluated["base"]["f1"])


def test_eval_on_a_data_file_and_a_merged_folder(trained, tmp_path):
    from lorakit.export.merge import merge_run

    data = tmp_path / "extra.json"
    data.write_text(
        json.dumps(
            [
                {"id": "x1", "question": PAIRS[0][0], "answer": "Paris"},
                {"id": "x2", "question": PAIRS[2][0], "answer": "blue"},
                {"id": "x3", "question": PAIRS[3][0], "answer": "four"},
            ]
        )
    )
    adapter = evaluate_path(trained, data=str(data), max_examples=2, out_dir=tmp_path / "a", verbose=False)
    assert adapter["n"] == 2 and adapter["base"] is None
    assert adapter["adapter"]["perplexity"] > 1
    quick = evaluate_path(
        trained, data=str(data), max_examples=2, out_dir=tmp_path / "q", perplexity=False, verbose=False
    )  # the same answers, without the second forward pass
    assert "perplexity" not in quick["adapter"] and quick["adapter"]["f1"] == adapter["adapter"]["f1"]
    assert (tmp_path / "q" / "report.md").is_file()
    merged = merge_run(trained, tmp_path / "merged")
    assert merged.passed
    via_merged = evaluate_path(
        tmp_path / "merged", data=str(data), max_examples=2, out_dir=tmp_path / "m", compare_base=True, verbose=False
    )
    assert [row["prediction"] for row in _lines(tmp_path / "m" / "predictions.jsonl")] == [
        row["prediction"] for row in _lines(tmp_path / "a" / "predictions.jsonl")
    ]
    assert via_merged["adapter"]["f1"] == pytest.approx(adapter["adapter"]["f1"])
    assert via_merged["base"] is not None  # the base it was merged from, same template


def test_eval_errors_name_the_fix(trained, tmp_path):
    with pytest.raises(EvalError, match="--split 'dev'"):
        evaluate_path(trained, split="dev", verbose=False)
    with pytest.raises(EvalError, match="split is empty"):
        evaluate_path(trained, split="validation", verbose=False)


# --- predictions made elsewhere ------------------------------------------------------------------


SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "T",
            "paragraphs": [
                {
                    "context": "Paris is the capital of France. The sky is blue.",
                    "qas": [
                        {
                            "id": "a1",
                            "question": "What is the capital of France?",
                            "answers": [{"text": "Paris", "answer_start": 0}],
                        },
                        {
                            "id": "a2",
                            "question": "What color is the sky?",
                            "answers": [{"text": "blue", "answer_start": 43}, {"text": "blue.", "answer_start": 43}],
                        },
                        {"id": "a3", "question": "Which country?", "answers": [{"text": "France", "answer_start": 24}]},
                    ],
                }
            ],
        }
    ],
}


@pytest.fixture()
def squad_file(tmp_path) -> Path:
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(SQUAD))
    return path


def test_score_official_squad_prediction_file(squad_file, tmp_path):
    predictions = tmp_path / "preds.json"
    predictions.write_text(json.dumps({"a1": "Paris", "a2": "the blue sky", "a3": "Germany"}))
    result = score_predictions(predictions, squad_file, out_dir=tmp_path / "out", verbose=False)
    assert result["n"] == 3
    assert result["adapter"]["exact_match"] == pytest.approx(100 / 3)
    # F1: 1 for a1; "the blue sky" vs "blue" -> tokens [blue, sky] vs [blue]: P 1/2, R 1 -> 2/3; 0 for a3
    assert result["adapter"]["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    assert (tmp_path / "out" / "report.html").is_file()


def test_score_jsonl_predictions(squad_file, tmp_path):
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(
        "".join(
            json.dumps({"id": i, "prediction": p}) + "\n"
            for i, p in (("a3", "France"), ("a1", "paris"), ("a2", "Blue."))
        )
    )
    result = score_predictions(predictions, squad_file, verbose=False)
    assert result["adapter"]["exact_match"] == 100.0
    lines = _lines(tmp_path / "preds-eval" / "predictions.jsonl")
    assert {row["id"]: row["prediction"] for row in lines} == {"a1": "paris", "a2": "Blue.", "a3": "France"}


def test_score_mismatched_ids_are_named(squad_file, tmp_path):
    predictions = tmp_path / "preds.json"
    predictions.write_text(json.dumps({"a1": "Paris", "zz9": "x"}))
    with pytest.raises(EvalError) as info:
        score_predictions(predictions, squad_file, verbose=False)
    message = str(info.value)
    assert "'a2'" in message and "'a3'" in message and "'zz9'" in message and "Fix:" in message


def test_score_malformed_predictions(squad_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a1", "prediction": "Paris"}\n{not json}\n')
    with pytest.raises(EvalError, match="line 2"):
        score_predictions(bad, squad_file, verbose=False)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"id": "a1", "answer": "Paris"}\n')
    with pytest.raises(EvalError, match="record 1"):
        score_predictions(wrong, squad_file, verbose=False)
