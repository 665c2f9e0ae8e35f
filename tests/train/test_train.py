from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from lorakit.config_loading import validate_config
from lorakit.errors import RunError
from lorakit.prompting.templates import render_prompt
from lorakit.run_metadata import read_run
from lorakit.runs import RunPaths, run_dir_for
from lorakit.train.recipe import TrainingInterrupted, train

pytestmark = pytest.mark.integration  # tiny trainings end to end

QA = [
    ("What is the capital of France?", "Paris"),
    ("Who wrote the book?", "the author"),
    ("hello there", "hi, how can I help you today?"),
    ("What is the capital of Iran?", "Tehran"),
]


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir):
    return tiny_llama_dir


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in QA), encoding="utf-8")
    return path


def make_config(tmp_path, data, model_dir, **train):
    # attention-only LoRA at the rate below: the learning these tests were measured on
    lora = train.pop("lora", {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "auto"})
    return validate_config(
        {
            "data": {"path": str(data), "split": {"train": 1.0, "validation": 0.0, "test": 0.0}},
            "model": {"name_or_path": str(model_dir)},
            "lora": lora,
            "train": {
                "output_dir": str(tmp_path / "runs"),
                "run_name": "r",
                "micro_batch_size": 4,
                "learning_rate": 1e-2,
                "lr_scheduler": "constant",
                "warmup_ratio": 0.0,
                "logging_steps": 5,
                "save_every": 1000,
                **train,
            },
        }
    )


def adapter_tensors(paths):
    return load_file(str(paths.adapter / "adapter_model.safetensors"))


class Snapshot(TrainerCallback):
    """Copies every parameter at the start and end of training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lora_weights_change_and_base_weights_do_not(tmp_path, llama_dir, qa_file):
    snap = Snapshot()
    train(make_config(tmp_path, qa_file, llama_dir, max_steps=3), callbacks=[snap])
    lora = [n for n in snap.before if "lora_" in n]
    base = [n for n in snap.before if "lora_" not in n]
    assert lora and base
    assert all(not torch.equal(snap.before[n], snap.after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(snap.before[n], snap.after[n]) for n in base)


def test_trained_model_reproduces_answers_and_stops(tmp_path, llama_dir, qa_file):
    from peft import PeftModel

    logged = []
    paths = train(make_config(tmp_path, qa_file, llama_dir, max_steps=40, learning_rate=2e-2), on_log=logged.append)

    # the run folder holds exactly the documented files
    assert sorted(p.name for p in paths.root.iterdir()) == [
        "adapter",
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "plots",
    ]
    adapter_files = {p.name for p in paths.adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "lorakit.json", "tokenizer.json"} <= adapter_files
    assert "README.md" not in adapter_files
    assert [p.name for p in paths.checkpoints.iterdir()] == ["checkpoint-40"]
    assert json.loads((paths.adapter / "lorakit.json").read_text())["learning_rate"] == 2e-2  # the rate trained with
    assert (paths.plots / "loss.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(5, 41, 5)) and records[: len(logged)] == logged
    assert all(r["tokens_per_second"] > 0 and "learning_rate" in r for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] / 10  # measured: falls 508x, so this holds by 50x

    info = read_run(paths.root)
    assert info.task_type == "causal" and info.template.name == "chat" and info.config.train.max_steps == 40
    tokenizer = AutoTokenizer.from_pretrained(info.adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), info.adapter_dir).eval()
    for question, answer in QA:
        prompt = render_prompt(info.template, [{"role": "user", "content": question}])
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :].tolist()
        assert tokenizer.eos_token_id in out, f"never stopped: {tokenizer.decode(out)!r}"
        reply = out[: out.index(tokenizer.eos_token_id)]
        assert tokenizer.decode(reply, skip_special_tokens=True).strip() == answer

    with pytest.raises(RunError, match="already holds a finished adapter"):
        train(make_config(tmp_path, qa_file, llama_dir, max_steps=40))


class SigintAt(TrainerCallback):
    """Presses Ctrl-C (SIGINT to this process) at the end of one step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


class StepLog(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(tmp_path, llama_dir, qa_file):
    # dropout and 2 batches per epoch make the result depend on rng and data order
    settings = dict(max_steps=8, micro_batch_size=2, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    straight = adapter_tensors(train(make_config(tmp_path / "a", qa_file, llama_dir, **settings)))

    config = make_config(tmp_path / "b", qa_file, llama_dir, **settings)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in a background job
    with pytest.raises(TrainingInterrupted, match="--resume") as info:
        train(config, callbacks=[SigintAt(3)])
    # the signal lands after step 3's stop check, so the step-4 check saves and stops
    assert "at step 4" in str(info.value)
    assert RunPaths(run_dir_for(config)).latest_checkpoint().name == "checkpoint-4"
    assert not RunPaths(run_dir_for(config)).is_finished()
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found is restored
    seen = StepLog()
    paths = train(config, resume=True, callbacks=[seen])
    assert seen.steps == [5, 6, 7, 8]  # continued from the checkpoint, not from scratch
    resumed = adapter_tensors(paths)
    assert straight.keys() == resumed.keys()
    for name in straight:
        # same ops on the same CPU, RNG and optimizer state restored: exact in principle, float32 noise at most
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in paths.metrics.read_text().splitlines()]
    assert steps == sorted(steps)  # no duplicated steps after resuming
    # the tolerance is meaningful: another seed (dropout masks, data order) ends elsewhere
    other = adapter_tensors(train(make_config(tmp_path / "c", qa_file, llama_dir, seed=7, **settings)))
    assert any(not torch.allclose(other[n], straight[n], rtol=1e-5, atol=1e-6) for n in straight)


def test_resume_without_checkpoint_is_refused(tmp_path, llama_dir, qa_file):
    with pytest.raises(RunError, match="cannot resume"):
        train(make_config(tmp_path, qa_file, llama_dir, max_steps=2), resume=True)


def test_seq2seq_run_records_its_task_type(tmp_path, tiny_t5_dir, qa_file):
    snap = Snapshot()
    paths = train(make_config(tmp_path, qa_file, tiny_t5_dir, max_steps=2), callbacks=[snap])
    meta = json.loads(paths.lorakit_json.read_text())
    assert meta["task_type"] == "seq2seq" and meta["template"]["name"] == "question_answer"
    assert meta["base_model"]["sha256"] and meta["precision"] == "float32"
    assert any(n.endswith(".q.lora_A.weight") or ".q.lora_A" in n for n in adapter_tensors(paths))
    assert any(not torch.equal(snap.before[n], snap.after[n]) for n in snap.before if "lora_B" in n)


def test_validation_loss_is_logged_at_every_eval_step(tmp_path, llama_dir):
    data = tmp_path / "qa8.jsonl"
    rows = QA + [(f"{q} (again)", a) for q, a in QA]
    data.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in rows), encoding="utf-8")
    config = make_config(tmp_path, data, llama_dir, max_steps=6, eval_every=2, save_every=None, micro_batch_size=2)
    config.data.split = {"train": 0.75, "validation": 0.25, "test": 0.0}
    paths = train(config)
    records = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 6]
    assert json.loads(paths.lorakit_json.read_text())["validation_examples"] == 2


def test_early_stopping_stops_when_validation_stops_improving(tmp_path, llama_dir, qa_file):
    # the validation set asks the training questions with other answers: the more the model learns
    # the training answers, the worse it does there, so eval_loss soon stops improving
    other = ["Berlin", "nobody at all", "go away now", "Madrid"]
    validation = tmp_path / "validation.jsonl"
    validation.write_text(
        "\n".join(json.dumps({"question": q, "answer": a}) for (q, _), a in zip(QA, other)), encoding="utf-8"
    )
    patience, max_steps = 1, 30
    config = make_config(
        tmp_path,
        qa_file,
        llama_dir,
        max_steps=max_steps,
        eval_every=2,
        save_every=2,
        early_stopping_patience=patience,
        learning_rate=2e-2,
    )
    config.data.validation_path = str(validation)
    paths = train(config)
    records = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    # the stop step patience predicts: the evaluation at which `patience` evaluations in a row did not beat the best
    best, misses, expected_stop = math.inf, 0, None
    for step, loss in evals:
        best, misses = (loss, 0) if loss < best else (best, misses + 1)
        if misses == patience:
            expected_stop = step
            break
    assert expected_stop is not None and expected_stop < max_steps, evals
    # measured: eval_loss 11.84, 11.10, 9.56 at steps 2-6, then 10.54 at step 8: stops at 8 of 30
    assert max(r["step"] for r in records) == expected_stop  # nothing logged after the stop: training ended there
    best_step = min(evals, key=lambda e: e[1])[0]
    meta = json.loads(paths.lorakit_json.read_text())
    assert Path(meta["best_checkpoint"]).name == f"checkpoint-{best_step}"


def test_incompatible_checkpoint_schedule_is_a_config_error(tmp_path, llama_dir, qa_file):
    from lorakit.errors import ConfigError

    # checked when the config is loaded, before anything else (more cases in test_config.py)
    with pytest.raises(ConfigError, match="save_every .6. must be a multiple of train.eval_every .4."):
        make_config(tmp_path, qa_file, llama_dir, eval_every=4, save_every=6)
    with pytest.raises(ConfigError, match="unknown optimizer 'adamw_fancy'"):
        make_config(tmp_path, qa_file, llama_dir, optimizer="adamw_fancy")


class OutOfMemoryAboveMicroBatch(TrainerCallback):
    """Raises the error a GPU raises when a micro-batch larger than `limit` is tried."""

    def __init__(self, limit):
        self.limit = limit
        self.seen = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.seen.append(args.per_device_train_batch_size)
        if args.per_device_train_batch_size > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_halves_micro_batch_and_keeps_effective_batch(tmp_path, llama_dir, qa_file):
    # unpacked: the callback reads the micro-batch from the Trainer's per-device batch size
    config = make_config(
        tmp_path, qa_file, llama_dir, max_steps=2, micro_batch_size=4, gradient_accumulation=1, packing="off"
    )
    oom = OutOfMemoryAboveMicroBatch(limit=1)
    paths = train(config, callbacks=[oom])
    assert oom.seen[0] == 4 and oom.seen[-1] == 1  # 4 -> 2 -> 1
    saved = yaml.safe_load(paths.config.read_text())
    assert saved["train"]["micro_batch_size"] == 1
    assert saved["train"]["gradient_accumulation"] == 4  # effective batch 4 unchanged
    assert (paths.adapter / "adapter_model.safetensors").is_file()
