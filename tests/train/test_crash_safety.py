"""Crash-safe training: kills, SIGTERM, repeated Ctrl-C, resume checks, non-finite losses, overwrite.

Real signals go to a real `lorakit train` child process (CHILD below runs cli.main with a test
callback). The child writes a marker file at the step we want and blocks in signal.pause() until
the parent's signal has been handled, so nothing here races against a timer.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from lorakit.config_loading import validate_config
from lorakit.errors import DataError, RunError
from lorakit.runs import CHECKPOINT_MARKER, RunPaths, staging_dir
from lorakit.train.recipe import TrainingInterrupted, train

pytestmark = pytest.mark.integration  # real signals to `lorakit train` child processes

SRC = Path(__file__).resolve().parents[2] / "src"
QA = [
    ("What is the capital of France?", "Paris"),
    ("Who wrote the book?", "the author"),
    ("hello there", "hi, how can I help you today?"),
    ("What is the capital of Iran?", "Tehran"),
]
# dropout and two batches per epoch: the result depends on the random state and data order
TRAIN = {
    "max_steps": 6,
    "micro_batch_size": 2,
    "learning_rate": 1e-2,
    "lr_scheduler": "constant",
    "warmup_ratio": 0.0,
    "logging_steps": 5,
    "save_every": 2,
    "run_name": "r",
}

CHILD = r"""
import json, os, signal, sys
from pathlib import Path
import torch
from transformers import TrainerCallback
import lorakit.train.recipe as lt

plan = json.loads(os.environ["CRASH_PLAN"])


class Hook(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if plan.get("second") == "step" and state.global_step == plan.get("pause_at"):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C in the middle of the next step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == plan.get("pause_at"):
            # the parent signals once the marker exists: blocked until then, so a signal that arrives
            # before this process waits stays pending (signal.pause() would miss it and wait forever)
            stops = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, stops)
            Path(plan["marker"]).write_text("paused")
            signum = signal.sigwaitinfo(stops).si_signo
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
            os.kill(os.getpid(), signum)  # delivered again, now to lorakit's handler
        if state.global_step == plan.get("kill_in_save_at"):
            real_save = torch.save

            def save_then_die(*a, **k):  # one file of the checkpoint lands, then the process is killed
                real_save(*a, **k)
                os.kill(os.getpid(), signal.SIGKILL)

            torch.save = save_then_die
        if plan.get("second") == "save" and state.global_step == plan.get("pause_at", -9) + 1:
            real_save2 = torch.save

            def save_with_sigint(*a, **k):  # a second Ctrl-C while the checkpoint is being written
                torch.save = real_save2
                os.kill(os.getpid(), signal.SIGINT)
                real_save2(*a, **k)

            torch.save = save_with_sigint


original = lt.train
lt.train = lambda config, **kw: original(config, **{**kw, "callbacks": [*(kw.get("callbacks") or []), Hook()]})
from lorakit.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in QA), encoding="utf-8")
    return path


def tree(tmp_path, data, model_dir, **train_overrides):
    return {
        "data": {"path": str(data), "split": {"train": 1.0, "validation": 0.0, "test": 0.0}},
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"output_dir": str(tmp_path / "runs"), **TRAIN, **train_overrides},
    }


def make_config(tmp_path, data, model_dir, **train_overrides):
    return validate_config(tree(tmp_path, data, model_dir, **train_overrides))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_file, tiny_llama_dir):
    """The uninterrupted run's adapter, which every resumed run must reproduce."""
    root = tmp_path_factory.mktemp("straight")
    return load_file(str(train(make_config(root, data_file, tiny_llama_dir)).adapter / "adapter_model.safetensors"))


def assert_same_adapter(paths, expected):
    got = load_file(str(paths.adapter / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        # a few dozen float32 roundings per element at the tensor's own scale; another seed
        # moves these weights by orders of magnitude more (test_train's ctrl-c test shows it)
        tol = 64 * torch.finfo(torch.float32).eps * max(1.0, want.abs().max().item())
        assert (got[name] - want).abs().max().item() <= tol, name


def run_child(tmp_path, data, model_dir, plan, send=(), extra_args=()):
    """Start `lorakit train` in a child; once it paused at plan['pause_at'], send the signals."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree(tmp_path, data, model_dir)), encoding="utf-8")
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    marker = tmp_path / "paused"
    env = dict(
        os.environ,
        CRASH_PLAN=json.dumps({**plan, "marker": str(marker)}),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    )
    child = subprocess.Popen(
        [sys.executable, str(script), "train", str(config), *extra_args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if send:
        deadline = time.monotonic() + 300
        while not marker.exists():  # the child writes it, then blocks until our signal arrives
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "child never reached the pause"
            time.sleep(0.05)
        for signum in send:
            child.send_signal(signum)
    out, err = child.communicate(timeout=300)
    return child.returncode, out, err, RunPaths(tmp_path / "runs" / "r")


class StepLog(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one(
    tmp_path, data_file, tiny_llama_dir, straight
):
    code, _, err, paths = run_child(tmp_path, data_file, tiny_llama_dir, {"kill_in_save_at": 4})
    assert code == -signal.SIGKILL, err[-2000:]
    torn = paths.checkpoints / "checkpoint-4"
    assert torn.is_dir() and not (torn / CHECKPOINT_MARKER).exists() and not (torn / "trainer_state.json").exists()
    assert paths.latest_checkpoint().name == "checkpoint-2"
    # without --resume the complete checkpoint-2 is still protected
    with pytest.raises(RunError, match="unfinished run.*checkpoint-2.*--resume"):
        train(make_config(tmp_path, data_file, tiny_llama_dir))
    seen = StepLog()
    resumed = train(make_config(tmp_path, data_file, tiny_llama_dir), resume=True, callbacks=[seen])
    assert seen.steps == [3, 4, 5, 6]
    assert_same_adapter(resumed, straight)
    assert all((folder / CHECKPOINT_MARKER).is_file() for folder in paths.checkpoints.iterdir())


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, data_file, tiny_llama_dir, straight):
    code, _, err, paths = run_child(
        tmp_path,
        data_file,
        tiny_llama_dir,
        {"pause_at": 3},
        send=[signal.SIGTERM],
        extra_args=["--set", "train.save_every=1000"],
    )
    assert code == 143, err[-2000:]
    assert "Traceback" not in err
    assert "error: training interrupted (SIGTERM) at step 4" in err and "--resume" in err
    assert [f.name for f in paths.checkpoints.iterdir()] == ["checkpoint-4"]
    assert paths.latest_checkpoint().name == "checkpoint-4" and not paths.is_finished()
    config = make_config(tmp_path, data_file, tiny_llama_dir, save_every=1000)
    assert_same_adapter(train(config, resume=True), straight)


@pytest.mark.parametrize("second", ["step", "save"])
def test_a_second_ctrl_c_never_replaces_the_checkpoint(tmp_path, data_file, tiny_llama_dir, straight, second):
    # the second Ctrl-C lands in the middle of the next step, or while its checkpoint is written
    code, _, err, paths = run_child(
        tmp_path,
        data_file,
        tiny_llama_dir,
        {"pause_at": 3, "second": second},
        send=[signal.SIGINT],
        extra_args=["--set", "train.save_every=1000"],
    )
    assert code == 130, err[-2000:]
    assert "SIGINT ignored" in err and "Traceback" not in err
    assert paths.latest_checkpoint().name == "checkpoint-4"
    config = make_config(tmp_path, data_file, tiny_llama_dir, save_every=1000)
    assert_same_adapter(train(config, resume=True), straight)


class Signals(TrainerCallback):
    """Sends `count` SIGINTs to this process at the end of one step."""

    def __init__(self, step, count):
        self.step, self.count = step, count

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for _ in range(self.count):
                os.kill(os.getpid(), signal.SIGINT)


def test_a_third_ctrl_c_quits_without_saving_anything(tmp_path, data_file, tiny_llama_dir):
    config = make_config(tmp_path, data_file, tiny_llama_dir)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in a background job
    with pytest.raises(TrainingInterrupted, match="nothing was saved.*checkpoint-2") as info:
        train(config, callbacks=[Signals(3, 3)])
    assert info.value.exit_code == 130
    paths = RunPaths(tmp_path / "runs" / "r")
    assert [f.name for f in paths.checkpoints.iterdir()] == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found is restored
    # before any checkpoint: the folder this attempt created goes away
    fresh = make_config(tmp_path / "b", data_file, tiny_llama_dir)
    with pytest.raises(TrainingInterrupted, match="no checkpoint"):
        train(fresh, callbacks=[Signals(1, 3)])
    assert not (tmp_path / "b").exists()


def test_resume_refuses_a_changed_config_or_a_finished_run(tmp_path, data_file, tiny_llama_dir):
    config = make_config(tmp_path, data_file, tiny_llama_dir)
    with pytest.raises(TrainingInterrupted):
        train(config, callbacks=[Signals(3, 1)])
    paths = RunPaths(tmp_path / "runs" / "r")
    before = paths.config.read_bytes()
    changed = make_config(tmp_path, data_file, tiny_llama_dir, learning_rate=5e-2, max_steps=8)
    with pytest.raises(
        RunError, match=r"train.learning_rate: 0.01 -> 0.05, train.max_steps: 6 -> 8.*--allow-config-change"
    ):
        train(changed, resume=True)
    assert paths.config.read_bytes() == before and paths.latest_checkpoint().name == "checkpoint-4"

    seen = StepLog()
    done = train(changed, resume=True, allow_config_change=True, callbacks=[seen])
    assert seen.steps == [5, 6, 7, 8]
    stored = yaml.safe_load(done.config.read_text())["train"]
    assert stored["learning_rate"] == 0.05 and stored["max_steps"] == 8
    history = json.loads(done.lorakit_json.read_text())["config_changes"]
    assert [h["resumed_at_step"] for h in history] == [4]
    assert history[0]["changes"]["train.learning_rate"] == {"old": 0.01, "new": 0.05}

    adapter = (done.adapter / "adapter_model.safetensors").read_bytes()
    with pytest.raises(RunError, match="already finished.*run_name=NEW"):
        train(changed, resume=True, allow_config_change=True)
    assert (done.adapter / "adapter_model.safetensors").read_bytes() == adapter


def test_a_failed_setup_leaves_nothing_and_keeps_what_was_there(tmp_path, data_file, tiny_llama_dir):
    nested = make_config(tmp_path, tmp_path / "missing.jsonl", tiny_llama_dir)
    nested.train.output_dir = str(tmp_path / "new" / "runs")
    with pytest.raises(DataError):
        train(nested)
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "runs" / "r"
    existing.mkdir(parents=True)
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(DataError):
        train(make_config(tmp_path, tmp_path / "missing.jsonl", tiny_llama_dir))
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]


class Poison(TrainerCallback):
    """Turns one base weight into NaN when step `step` begins (a diverging model, made on purpose)."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            weight = next(
                p for n, p in model.named_parameters() if "down_proj.base_layer" in n or n.endswith("down_proj.weight")
            )
            weight.data[0, 0] = float("nan")


class InfiniteGradient(TrainerCallback):
    """After the guard's own gradient check, makes one LoRA gradient infinite: Adam turns the weight into NaN."""

    def __init__(self, step):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            next(p for n, p in model.named_parameters() if "lora_A" in n).grad.fill_(float("inf"))


@pytest.mark.parametrize(
    "fault,what",
    [(Poison, "the loss is not a finite number"), (InfiniteGradient, "the optimizer step made the LoRA weights NaN")],
)
def test_a_non_finite_step_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path, data_file, tiny_llama_dir, fault, what
):
    # logging_steps=5 > the failing step: the check runs every step, not only when logging
    config = make_config(tmp_path, data_file, tiny_llama_dir)
    with pytest.raises(RunError, match=f"step 4: {what}.*last good checkpoint is .*checkpoint-2") as info:
        train(config, callbacks=[fault(4)])
    assert info.value.exit_code == 2 and "learning_rate" in info.value.hint
    paths = RunPaths(tmp_path / "runs" / "r")
    assert [f.name for f in paths.checkpoints.iterdir()] == ["checkpoint-2"] and not paths.adapter.exists()
    weights = load_file(str(paths.checkpoints / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(t.isfinite().all() for t in weights.values())


def digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_failing_overwrite_keeps_the_old_run_byte_identical(tmp_path, data_file, tiny_llama_dir):
    old = train(make_config(tmp_path, data_file, tiny_llama_dir, max_steps=2))
    (old.root / "notes.txt").write_text("mine")
    before = digest(old.root)
    again = make_config(tmp_path, data_file, tiny_llama_dir, overwrite=True, learning_rate=5e-2)

    with pytest.raises(RunError, match="step 1: the loss"):  # fails before its first checkpoint
        train(again, callbacks=[Poison(1)])
    assert digest(old.root) == before and not staging_dir(old.root).exists()

    with pytest.raises(RunError, match="step 4: the loss"):  # fails after a checkpoint
        train(again, callbacks=[Poison(4)])
    assert digest(old.root) == before
    staged = RunPaths(staging_dir(old.root))
    assert staged.latest_checkpoint().name == "checkpoint-2"  # kept: --resume continues the new run

    seen = StepLog()
    new = train(again, resume=True, callbacks=[seen])
    assert seen.steps == [3, 4, 5, 6] and new.root == old.root and not staged.root.exists()
    assert (new.root / "notes.txt").read_text() == "mine"  # the user's own file survives the overwrite
    assert yaml.safe_load(new.config.read_text())["train"]["learning_rate"] == 0.05
    assert digest(new.adapter)["adapter_model.safetensors"] != before["adapter/adapter_model.safetensors"]
    assert json.loads(new.lorakit_json.read_text())["global_step"] == 6
    assert not any(p.name.startswith(".r.") for p in (tmp_path / "runs").iterdir())
