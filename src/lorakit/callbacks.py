"""Trainer callbacks: metrics.jsonl, a rich progress bar, and a Ctrl-C that saves a checkpoint."""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from transformers import TrainerCallback

# keys the Trainer logs that we store under shorter, documented names
_RENAMES = {"train_tokens_per_second": None, "num_input_tokens_seen": "tokens_seen"}


class MetricsFileCallback(TrainerCallback):
    """Append one JSON line per Trainer log to metrics.jsonl (step, epoch, loss, learning_rate,
    grad_norm, tokens_per_second, eval_loss, ...), and pass each record to `on_log`.

    tokens_per_second counts non-padding input tokens between two logs (the Trainer tracks them
    with include_num_input_tokens_seen="non_padding").
    """

    def __init__(self, path: Path, on_log: Optional[Callable[[dict], None]] = None):
        self.path = Path(path)
        self.on_log_fn = on_log
        self._last_time: Optional[float] = None
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


def read_metrics(path: Path) -> list[dict]:
    """The records in metrics.jsonl (skipping a torn last line after a crash)."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, forget records logged after the checkpoint so steps are not duplicated."""
    from .runs import atomic_write_text

    if not Path(path).is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


class RichProgressCallback(TrainerCallback):
    """One progress bar for training with loss, learning rate, tokens/s and ETA."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.progress = None
        self.task = None
        self._status = ""

    def on_train_begin(self, args, state, control, **kwargs):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
        self._time, self._tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=self._status)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            now = time.perf_counter()
            speed = (state.num_input_tokens_seen - self._tokens) / max(now - self._time, 1e-9)
            self._time, self._tokens = now, state.num_input_tokens_seen
            parts = [f"loss {logs['loss']:.4f}"]
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.2e}")
            parts.append(f"{speed:,.0f} tok/s")
            self._status = "  ".join(parts)
        if "eval_loss" in logs and self.progress is not None:
            self.progress.console.print(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class InterruptCallback(TrainerCallback):
    """The first Ctrl-C asks the Trainer to save a checkpoint after the current step and stop;
    a second one interrupts at once (the original handler is restored)."""

    def __init__(self):
        self.interrupted = False
        self._previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        self.interrupted = True
        self.uninstall()  # a second Ctrl-C raises KeyboardInterrupt as usual

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control
