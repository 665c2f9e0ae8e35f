"""Trainer callbacks: metrics.jsonl, a rich progress bar, a Ctrl-C / SIGTERM that saves a checkpoint,
checkpoints that count only when complete, and a stop at the first non-finite loss."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

if TYPE_CHECKING:
    from transformers import Trainer

from ..runs import read_metrics

# keys the Trainer logs that we store under shorter, documented names
_RENAMES = {"train_tokens_per_second": None, "num_input_tokens_seen": "tokens_seen"}


class MetricsFileCallback(TrainerCallback):
    """Append one JSON line per Trainer log to metrics.jsonl (step, epoch, loss, learning_rate,
    grad_norm, tokens_per_second, eval_loss, ...), and pass each record to `on_log`.

    tokens_per_second counts non-padding input tokens between two logs (the Trainer tracks them
    with include_num_input_tokens_seen="non_padding").
    """

    def __init__(self, path: Path, on_log: Callable[[dict], None] | None = None):
        self.path = Path(path)
        self.on_log_fn = on_log
        self._last_time: float | None = None
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for key, value in logs.items():
            name = _RENAMES.get(key, key)
            if name is None or key == "epoch":
                continue
            if isinstance(value, float) and not math.isfinite(value):
                value = None  # keep the file valid JSON
            record[name] = value
        now = time.perf_counter()
        if "loss" in logs and self._last_time is not None:
            tokens = state.num_input_tokens_seen - self._last_tokens
            elapsed = max(now - self._last_time, 1e-9)
            record["tokens_per_second"] = round(tokens / elapsed, 1)
            self._last_time, self._last_tokens = now, state.num_input_tokens_seen
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
        if self.on_log_fn is not None:
            self.on_log_fn(record)


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, forget records logged after the checkpoint so steps are not duplicated."""
    from ..files import atomic_write_text

    if not Path(path).is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


class RichProgressCallback(TrainerCallback):
    """Training progress on stderr: a live bar with loss, learning rate, tokens/s and ETA on a
    terminal; elsewhere (a log file, CI, nohup), where a live bar shows nothing until the end, one
    plain line every `interval_s` seconds or `interval_fraction` of the steps, whichever comes
    first, and one at the end:

        step 120/500 (24%)  loss 1.2345  lr 1.0e-04  312 tok/s  elapsed 5m02s  ETA 15m50s

    `clock` (seconds, monotonic) is injectable so the interval can be tested without waiting.
    """

    def __init__(
        self,
        console=None,
        *,
        interval_s: float = 30.0,
        interval_fraction: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.interval_s, self.interval_fraction, self.clock = interval_s, interval_fraction, clock
        self.progress = None
        self.task = None
        self._status = ""
        self._loss: float | None = None
        self._lr: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._time, self._tokens = time.perf_counter(), state.num_input_tokens_seen
        # the plain lines' own marks: tokens/s and ETA over the whole run, from the step it (re)started at
        self._start, self._start_step, self._start_tokens = self.clock(), state.global_step, state.num_input_tokens_seen
        self._line_time, self._line_step = self._start, state.global_step
        if not self.console.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, status="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=self._status)
        elif not self.console.is_terminal:
            every_steps = max(1, math.ceil(state.max_steps * self.interval_fraction))
            if self.clock() - self._line_time >= self.interval_s or state.global_step - self._line_step >= every_steps:
                self._plain_line(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            now = time.perf_counter()
            speed = (state.num_input_tokens_seen - self._tokens) / max(now - self._time, 1e-9)
            self._time, self._tokens = now, state.num_input_tokens_seen
            self._loss, self._lr = logs["loss"], logs.get("learning_rate")
            parts = [f"loss {logs['loss']:.4f}"]
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.2e}")
            parts.append(f"{speed:,.0f} tok/s")
            self._status = "  ".join(parts)
        if "eval_loss" in logs:
            self.console.print(
                f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}", markup=False, highlight=False
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is None and not self.console.is_terminal and state.global_step != self._line_step:
            self._plain_line(state)  # the last line always shows the final step
        self.stop()

    def _plain_line(self, state) -> None:
        now = self.clock()
        elapsed, done = now - self._start, state.global_step - self._start_step
        parts = [f"step {state.global_step}/{state.max_steps} ({100 * state.global_step // max(state.max_steps, 1)}%)"]
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4f}")
        if self._lr is not None:
            parts.append(f"lr {self._lr:.1e}")
        if elapsed > 0:
            parts.append(f"{(state.num_input_tokens_seen - self._start_tokens) / elapsed:,.0f} tok/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if done > 0:
            parts.append(f"ETA {_duration(elapsed / done * max(state.max_steps - state.global_step, 0))}")
        self.console.print("  ".join(parts), markup=False, highlight=False, soft_wrap=True)
        self._line_time, self._line_step = now, state.global_step

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _duration(seconds: float) -> str:
    """5m02s, 1h05m02s: short enough for a log line, unambiguous."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class InterruptCallback(TrainerCallback):
    """SIGINT (Ctrl-C) or SIGTERM (docker stop, SLURM, pre-emption) asks the Trainer to save a
    checkpoint after the current step and stop.

    Later signals never start a second save: a checkpoint written in the middle of a step would
    hold mid-step random state, and resuming from it would not reproduce the run. They are
    ignored while the step finishes and the checkpoint is written; only a third Ctrl-C quits at
    once, saving nothing (the newest complete checkpoint stays as it was).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal received
        self.stopped_at: int | None = None  # the step after which the checkpoint was asked for
        self._extra_ctrl_c = 0
        self._previous: dict = {}

    @property
    def interrupted(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            _say(f"{name}: stopping after the current step and saving a checkpoint (this may take a moment).")
            return
        if signum == signal.SIGINT:
            self._extra_ctrl_c += 1
            if self._extra_ctrl_c >= 2:
                raise KeyboardInterrupt  # the user insists: quit now, saving nothing
        _say(
            f"{name} ignored: already stopping; the checkpoint is written after the current step"
            + (" (press Ctrl-C once more to quit without saving)." if signum == signal.SIGINT else ".")
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum is not None and self.stopped_at is None:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def _say(message: str) -> None:
    # plain write: a signal handler must not wait for the rich console's lock
    sys.stderr.write(f"\n{message}\n")
    sys.stderr.flush()


class CheckpointCompletionCallback(TrainerCallback):
    """A checkpoint counts only once it is complete (runs.CHECKPOINT_MARKER, written last).

    The Trainer writes checkpoint-N file by file and then deletes old checkpoints; a kill in
    between would leave an incomplete newest one, or none at all. So the Trainer's own rotation
    is off (save_total_limit=None in its arguments) and this callback marks the new checkpoint
    complete first, then deletes the oldest complete ones beyond `keep` (the best one is kept).
    """

    def __init__(self, keep: int | None, main: bool):
        self.keep = keep
        self.main = main

    def _folder(self, args, state) -> Path:
        return Path(args.output_dir) / f"checkpoint-{state.global_step}"

    def on_step_end(self, args, state, control, **kwargs):
        # the Trainer saves right after this; a folder of the same step being rewritten is incomplete meanwhile
        if self.main and control.should_save:
            from ..runs import unmark_checkpoint

            unmark_checkpoint(self._folder(args, state))
        return control

    def on_save(self, args, state, control, **kwargs):
        if not self.main:
            return control
        from transformers.trainer_utils import rotate_checkpoints

        from ..runs import mark_checkpoint_complete

        mark_checkpoint_complete(self._folder(args, state), state.global_step)
        rotate_checkpoints(
            str(args.output_dir), save_total_limit=self.keep, best_model_checkpoint=state.best_model_checkpoint
        )
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # what the Trainer does at the end with save_total_limit=1: only the best checkpoint remains
        best = state.best_model_checkpoint
        if self.main and self.keep == 1 and best and Path(best).is_dir():
            for folder in Path(args.output_dir).glob("checkpoint-*"):
                if folder.is_dir() and not folder.samefile(best):
                    shutil.rmtree(folder, ignore_errors=True)
        return control


class NonFiniteTraining(Exception):
    """Raised by NonFiniteGuard; train/recipe.py turns it into a RunError that names the fix."""

    def __init__(self, step: int, what: str, loss: float | None):
        self.step, self.what, self.loss = step, what, loss
        super().__init__(f"step {step}: {what} (loss {loss})")


class NonFiniteGuard(TrainerCallback):
    """Stops training at the first step whose loss, gradients or updated LoRA weights are NaN or
    infinite, before that step can be saved. The Trainer only filters such losses out of its logs
    (logging_nan_inf_filter), and it logs every logging_steps only, so this checks every step.

    Cost: one reduction over the trainable (LoRA) tensors and one host sync per optimizer step.
    Under fp16 the gradient scaler skips steps with infinite gradients by design, so there only
    the weights are checked.
    """

    def __init__(self) -> None:
        self._losses: list = []
        self._strict = True

    def attach(self, model) -> None:
        # the Trainer gives callbacks no per-step loss; a forward hook sees each micro-batch's
        model.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if module.training:
            self.record_loss(loss)

    def record_loss(self, loss) -> None:
        """A training micro-batch's loss (the Trainer's own loss path bypasses the model's forward)."""
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())

    def _loss(self) -> float | None:
        if not self._losses:
            return None
        values = torch.stack([loss.float().mean() for loss in self._losses])
        bad = values[~torch.isfinite(values)]
        return float(bad[0] if bad.numel() else values.mean())

    def on_train_begin(self, args, state, control, **kwargs):
        self._strict = not args.fp16

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._strict and model is not None:
            grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
            checks = [torch.isfinite(g).all() for g in grads] + [torch.isfinite(x.float()).all() for x in self._losses]
            if checks and not bool(torch.stack(checks).all()):
                loss = self._loss()
                what = (
                    "the loss is not a finite number"
                    if loss is not None and not math.isfinite(loss)
                    else "the gradients are not finite"
                )
                raise NonFiniteTraining(state.global_step + 1, what, loss)
        return control

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            params = [p for p in model.parameters() if p.requires_grad]
            if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
                raise NonFiniteTraining(
                    state.global_step + 1, "the optimizer step made the LoRA weights NaN or infinite", self._loss()
                )
        self._losses = []
        return control


def remove_default_printers(trainer: Trainer) -> None:
    """The rich bar replaces the Trainer's tqdm bar and its printed dicts."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
