"""A plan as a table for the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .memory import (
    fmt_bytes,
)
from .planner import Plan

if TYPE_CHECKING:
    from rich.console import Console


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render_plan(plan: Plan, choices: list[str] | None = None, console: Console | None = None) -> str:
    """The plan as plain text; drawn with rich on `console` too when one is given (the CLI's).

    Args:
        plan: what plan_run predicted.
        choices: the choices fit_config made, shown under "fitted".
        console: a rich Console to draw on; default none (nothing is printed).

    Returns:
        The plan as plain text.
    """
    import io

    from rich.console import Console
    from rich.table import Table

    console = console or Console(record=True, file=io.StringIO())
    if not console.record:
        console.record = True
    s = plan.shape
    console.print(
        f"[bold]{s.model_type}[/bold] from {s.source}: {s.n_params / 1e6:.1f}M parameters, {s.num_layers} layers"
        f"{f' + {s.num_decoder_layers} decoder layers' if s.is_seq2seq else ''}, hidden {s.hidden_size}, "
        f"{s.num_heads} heads ({s.num_kv_heads} kv), intermediate {s.intermediate_size}, vocab {s.vocab_size}"
        f"{', tied embeddings' if s.tied_embeddings else ''}"
    )
    t = plan.config.train
    peak = (
        f"packed ({plan.packing}), the largest micro-batch {plan.rows} row(s) x {plan.seq_len} tokens"
        if plan.packing != "off"
        else f"longest batch {plan.seq_len} tokens"
    )
    console.print(
        f"device: {plan.device.label}; precision {plan.precision}\n"
        f"batch: micro-batch {t.micro_batch_size} x accumulation {t.gradient_accumulation}; {peak}"
        f"{f' (target {plan.target_len})' if plan.target_len else ''}; checkpointing {'on' if t.gradient_checkpointing else 'off'}"
    )
    table = Table(title="Predicted peak memory")
    table.add_column("part")
    table.add_column("memory", justify="right")
    table.add_column("share", justify="right")
    total = plan.memory.total
    for name, nbytes in [*plan.memory.parts.items(), ("overhead", plan.memory.overhead)]:
        table.add_row(name, fmt_bytes(nbytes), f"{100 * nbytes / total:.0f}%")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    table.add_row(
        "[bold]total[/bold]", f"[bold]{fmt_bytes(total)}[/bold]", f"{verdict} in {fmt_bytes(plan.device.memory_bytes)}"
    )
    console.print(table)
    console.print(
        f"time: {_duration(plan.time.seconds_per_step)} per step x {plan.steps} steps = {_duration(plan.total_seconds)} "
        f"({plan.epochs:g} epochs of {plan.n_train} examples: {plan.tokens_per_epoch} tokens per epoch, "
        f"{int(plan.tokens_per_epoch * plan.epochs)} in all)"
    )
    console.print(
        f"  {plan.time.flops_per_token / 1e6:.1f} MFLOPs/token at {plan.time.device_flops / 1e12:.3g} TFLOP/s; {plan.time.formula}"
    )
    for note in plan.notes:
        console.print(f"  note: {note}")
    if choices:
        console.print("[bold]fitted[/bold]:")
        for choice in choices:
            console.print(f"  - {choice}")
    if plan.advice:
        console.print("[bold]to make it fit[/bold]:")
        for line in plan.advice:
            console.print(f"  - {line}")
    return console.export_text()
