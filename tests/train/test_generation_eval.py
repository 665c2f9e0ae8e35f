"""Generation-based validation during training: EM/F1 logged with the losses, usable for early stopping."""

from __future__ import annotations

import json

import pytest

from lorakit.config_loading import validate_config
from lorakit.runs import read_metrics
from lorakit.train.recipe import train

pytestmark = pytest.mark.integration  # tiny trainings with generation-based validation

COLOURS = ["sky", "sea", "ink", "jeans", "sapphire", "cobalt", "lake", "ocean", "bluebird", "iris", "denim", "navy"]


def write(path, names):
    path.write_text(
        "\n".join(json.dumps({"question": f"What colour is the {n}?", "answer": "blue"}) for n in names),
        encoding="utf-8",
    )
    return path


def config_for(tmp_path, model_dir, **train):
    return validate_config(
        {
            "data": {
                "path": str(write(tmp_path / "train.jsonl", COLOURS[:8])),
                "validation_path": str(write(tmp_path / "valid.jsonl", COLOURS[8:])),
                "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
            },
            "model": {"name_or_path": str(model_dir)},
            # attention-only LoRA: the learning curve the assertions below were measured on
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "auto"},
            "eval": {"max_new_tokens": 6},
            "train": {
                "output_dir": str(tmp_path / "runs"),
                "run_name": "gen",
                "micro_batch_size": 8,
                "learning_rate": 1e-2,
                "lr_scheduler": "constant",
                "warmup_ratio": 0.0,
                "logging_steps": 5,
                "generation_eval_every": 5,
                "generation_eval_examples": 4,
                **train,
            },
        }
    )


def test_generation_metrics_are_logged_with_the_losses(tmp_path, tiny_llama_dir):
    paths = train(config_for(tmp_path, tiny_llama_dir, max_steps=25, best_metric="f1"))
    evals = [line for line in read_metrics(paths.metrics) if "eval_f1" in line]
    assert [line["step"] for line in evals] == [5, 10, 15, 20, 25]
    for line in evals:
        assert "eval_loss" in line and "eval_exact_match" in line and "eval_never_stops_rate" in line
        assert 0.0 <= line["eval_f1"] <= 100.0
    # held-out questions share the answer "blue": real generations learn it
    assert evals[0]["eval_f1"] < 100.0
    # measured: F1 0, 0, 100, 100, 100 at steps 5-25, so the end is two evaluations past the first 100;
    # the teacher-forced loss on the held-out answers fell 3.65 -> 0.067 (54x), asserted with a 5x margin
    assert evals[-1]["eval_f1"] == 100.0 and evals[-1]["eval_exact_match"] == 100.0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] / 10
    meta = json.loads((paths.adapter / "lorakit.json").read_text())
    assert meta["best_checkpoint"] is not None


def test_early_stopping_on_f1(tmp_path, tiny_llama_dir):
    # lr 0: F1 never improves, so patience 1 stops after the second evaluation
    config = config_for(tmp_path, tiny_llama_dir, max_steps=40, best_metric="f1", early_stopping_patience=1)
    config.train.learning_rate = 1e-12
    paths = train(config)
    evals = [line["step"] for line in read_metrics(paths.metrics) if "eval_f1" in line]
    assert evals == [5, 10]
