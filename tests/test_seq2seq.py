"""FLAN-T5-style models go through the same workflow: train, generate, eval, merge, serve."""

from __future__ import annotations

import json

import pytest

from lorakit.config import validate_config
from lorakit.evaluate.runner import evaluate_path
from lorakit.export import merge_run
from lorakit.infer import generate_command, load_predictor
from lorakit.train import train

QA = [
    ("What is the capital of France?", "Paris"),
    ("Who wrote the book?", "the author"),
    ("hello there", "hi, how can I help you today?"),
    ("What is the capital of Iran?", "Tehran"),
]


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, tiny_t5_dir):
    folder = tmp_path_factory.mktemp("t5")
    data = folder / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in QA), encoding="utf-8")
    config = validate_config({
        "data": {"path": str(data), "split": {"train": 1.0, "validation": 0.0, "test": 0.0}},
        "model": {"name_or_path": str(tiny_t5_dir)},  # task type detected from the config
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {
            "output_dir": str(folder / "runs"), "run_name": "t5", "micro_batch_size": 4, "max_steps": 400,
            "learning_rate": 5e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 50,
            "save_every": 1000,
        },
    })
    return train(config), data


def test_seq2seq_learns_and_reproduces_its_answers(t5_run):
    paths, _ = t5_run
    meta = json.loads(paths.lorakit_json.read_text())
    assert meta["task_type"] == "seq2seq"
    for question, answer in QA:
        assert generate_command(str(paths.root), question) == answer


def test_seq2seq_eval_scores_the_generations(t5_run, tmp_path):
    paths, data = t5_run
    summary = evaluate_path(str(paths.root), data=str(data), compare_base=True, out_dir=str(tmp_path), verbose=False)
    assert summary["adapter"]["exact_match"] == 100.0
    assert summary["base"]["exact_match"] < 100.0
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert sorted(line["prediction"] for line in lines) == sorted(a for _, a in QA)


def test_seq2seq_merge_equals_adapter_and_serves(t5_run, tmp_path):
    from fastapi.testclient import TestClient

    from lorakit.serve import create_app

    paths, _ = t5_run
    report = merge_run(str(paths.root), str(tmp_path / "merged"))
    assert report.passed and report.max_abs_diff < 1e-4
    merged = load_predictor(str(tmp_path / "merged"))
    assert merged.task_type == "seq2seq" and not merged.has_adapter
    for question, answer in QA:
        assert generate_command(str(tmp_path / "merged"), question) == answer
    with TestClient(create_app([f"t5={paths.root}"], max_tokens_limit=32)) as http:
        reply = http.post("/v1/chat/completions", json={
            "model": "t5", "messages": [{"role": "user", "content": QA[0][0]}], "max_tokens": 16,
        })
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == QA[0][1]
