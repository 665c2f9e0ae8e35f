"""Progress off a terminal (log file, CI, nohup): plain lines at a steady interval and one at the
end, driven by a fake clock, so nothing here sleeps; on a terminal the live bar, no plain lines."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from lorakit.train.callbacks import RichProgressCallback


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(
    callback: RichProgressCallback, clock: Clock, max_steps: int, seconds_per_step: float, tokens_per_step: int = 64
):
    """Drive the callback as the Trainer does: begin, then per step step_end + a loss log, then end."""
    state = SimpleNamespace(global_step=0, max_steps=max_steps, num_input_tokens_seen=0)
    callback.on_train_begin(None, state, None)
    for step in range(1, max_steps + 1):
        clock.now += seconds_per_step
        state.global_step, state.num_input_tokens_seen = step, step * tokens_per_step
        callback.on_step_end(None, state, None)
        callback.on_log(None, state, None, logs={"loss": 2.0 / step, "learning_rate": 1e-4})
    callback.on_train_end(None, state, None)


def plain(**kwargs) -> tuple[RichProgressCallback, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    console = Console(file=out, force_terminal=False, width=200)
    return RichProgressCallback(console, clock=clock, **kwargs), out, clock


def test_off_a_terminal_a_line_every_interval_seconds_and_one_at_the_end():
    callback, out, clock = plain(interval_s=30.0, interval_fraction=1.0)  # only the clock triggers lines
    run(callback, clock, max_steps=10, seconds_per_step=10.0)
    lines = out.getvalue().splitlines()
    # 10 s a step, a line once 30 s have passed since the last: steps 3, 6, 9, then the end (10)
    assert [line.split()[1] for line in lines] == ["3/10", "6/10", "9/10", "10/10"]
    # at step 3 the newest logged loss is step 2's (the Trainer logs after on_step_end): 2.0 / 2
    assert lines[0] == "step 3/10 (30%)  loss 1.0000  lr 1.0e-04  6 tok/s  elapsed 0m30s  ETA 1m10s"
    # the end line follows the last log: step 10's loss, 2.0 / 10
    assert lines[-1] == "step 10/10 (100%)  loss 0.2000  lr 1.0e-04  6 tok/s  elapsed 1m40s  ETA 0m00s"


def test_off_a_terminal_a_line_every_fraction_of_steps_when_that_comes_first():
    callback, out, clock = plain(interval_s=3600.0, interval_fraction=0.25)
    run(callback, clock, max_steps=20, seconds_per_step=0.5)
    steps = [line.split()[1] for line in out.getvalue().splitlines()]
    assert steps == ["5/20", "10/20", "15/20", "20/20"]  # 25% of 20 steps; the end is not repeated


def test_long_runs_show_hours_in_elapsed_and_eta():
    callback, out, clock = plain(interval_s=30.0, interval_fraction=0.5)
    run(callback, clock, max_steps=4, seconds_per_step=3723.0)  # 1 h 2 min 3 s a step
    first = out.getvalue().splitlines()[0]
    assert first.endswith("elapsed 1h02m03s  ETA 3h06m09s")


def test_on_a_terminal_the_live_bar_and_no_plain_lines():
    out, clock = io.StringIO(), Clock()
    callback = RichProgressCallback(Console(file=out, force_terminal=True, width=200), clock=clock, interval_s=1.0)
    run(callback, clock, max_steps=6, seconds_per_step=10.0)
    text = out.getvalue()
    assert "6/6" in text and "elapsed" not in text  # the bar's M/N column, never a plain line
    assert callback.progress is None  # stopped at the end
