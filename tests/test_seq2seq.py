"""FLAN-T5-style models go through the same workflow: train, generate, eval, merge, serve."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from lorakit.cli_commands import generate_command
from lorakit.config_loading import validate_config
from lorakit.evaluate.runner import evaluate_path
from lorakit.export.merge import merge_run
from lorakit.inference.predictor import load_predictor
from lorakit.train.recipe import train

pytestmark = pytest.mark.integration  # a tiny T5 trained, evaluated, merged and served

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
    config = validate_config(
        {
            "data": {"path": str(data), "split": {"train": 1.0, "validation": 0.0, "test": 0.0}},
            "model": {"name_or_path": str(tiny_t5_dir)},  # task type detected from the config
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
            "train": {
                "output_dir": str(folder / "runs"),
                "run_name": "t5",
                "micro_batch_size": 4,
                "max_steps": 400,
                "learning_rate": 5e-3,
                "lr_scheduler": "constant",
                "warmup_ratio": 0.0,
                "logging_steps": 50,
                "save_every": 1000,
            },
        }
    )
    return train(config), data


def test_seq2seq_learns_and_reproduces_its_answers(t5_run):
    paths, _ = t5_run
    meta = json.loads(paths.lorakit_json.read_text())
    assert meta["task_type"] == "seq2seq"
    # Exact answers hold by a wide margin, not by luck of this CPU: greedy decoding reproduces an
    # answer when, teacher-forced, every answer token has p > 1/2 (loss < ln 2). The fixture's
    # 400 steps at 5e-3 leave the worst token near 1e-5 (its logged training loss, ~0.1, includes
    # T5's dropout), so a different CPU's rounding cannot flip a token.
    predictor = load_predictor(str(paths.root))
    with torch.inference_mode():
        worst = max(float(_token_losses(predictor.model, predictor, question, answer).max()) for question, answer in QA)
    assert worst < math.log(2) / 100, worst
    for question, answer in QA:
        assert generate_command(str(paths.root), question) == answer


def test_seq2seq_eval_scores_the_generations(t5_run, tmp_path):
    paths, data = t5_run
    summary = evaluate_path(str(paths.root), data=str(data), compare_base=True, out_dir=str(tmp_path), verbose=False)
    assert summary["adapter"]["exact_match"] == 100.0  # see test_seq2seq_learns_and_reproduces_its_answers
    assert summary["base"]["exact_match"] < 100.0
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert sorted(line["prediction"] for line in lines) == sorted(a for _, a in QA)


def test_seq2seq_merge_equals_adapter_and_serves(t5_run, tmp_path):
    from fastapi.testclient import TestClient

    from lorakit.serve.app import create_app

    paths, _ = t5_run
    report = merge_run(str(paths.root), str(tmp_path / "merged"))
    assert report.passed  # export's own bound: atol + rtol x the largest |logit| of each prompt
    merged = load_predictor(str(tmp_path / "merged"))
    # No fixed bound (1e-4 failed on another CPU). The float32 noise of this very computation is
    # measured here: base + adapter in float32 against the same in float64. The merged model is
    # another float32 rounding of the same exact result (plus one rounding of W + s*BA per weight),
    # so its error is of that order; 4x leaves room for the max of one rounding pattern exceeding
    # another's (measured 1.4x here), and a real merge mistake is orders of magnitude larger.
    adapter = load_predictor(str(paths.root))
    exact = _logits(copy.deepcopy(adapter.model).double(), adapter)
    noise = (_logits(adapter.model, adapter) - exact).abs().max().item()
    error = (_logits(merged.model, adapter) - exact).abs().max().item()
    assert noise > 0 and error <= 4 * noise, (error, noise)
    assert merged.task_type == "seq2seq" and not merged.has_adapter
    for question, answer in QA:
        assert generate_command(str(tmp_path / "merged"), question) == answer
    with TestClient(create_app([f"t5={paths.root}"], max_tokens_limit=32)) as http:
        reply = http.post(
            "/v1/chat/completions",
            json={
                "model": "t5",
                "messages": [{"role": "user", "content": QA[0][0]}],
                "max_tokens": 16,
            },
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == QA[0][1]


def _teacher_forced(model, predictor, question, answer):
    ids = torch.tensor([predictor.prompt_ids([{"role": "user", "content": question}])])
    target = predictor.tokenizer(answer, return_tensors="pt").input_ids
    return model(input_ids=ids, labels=target).logits[0], target[0]


def _token_losses(model, predictor, question, answer):
    logits, target = _teacher_forced(model, predictor, question, answer)
    return torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")


def _logits(model, predictor):
    """Decoder logits for every QA prompt, teacher-forced on its answer, as float64."""
    with torch.inference_mode():
        return torch.cat([_teacher_forced(model, predictor, q, a)[0].flatten().double() for q, a in QA])
