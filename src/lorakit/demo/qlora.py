"""`lorakit demo --qlora`: the seeds' QLoRA recipe beside the 32-bit LoRA demo, on the CPU.

Both fine-tune SmolLM2-135M-Instruct on the bundled reading-comprehension set with the demo's
settings (demo/end_to_end.py) and are evaluated on the same held-out articles:

    32-bit LoRA   the demo as it is: float32 base, adamw_torch
    4-bit QLoRA   NF4 + double quantization (float32 compute), paged_adamw_8bit, gradient checkpointing

Peak memory is each training's own: it runs in a fresh process (multiprocessing, spawn), whose
peak resident set (ru_maxrss) is read when training ends, so memory the other run's process kept
(allocator caches, file pages) never counts twice.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

logger = logging.getLogger("lorakit.demo")

QLORA: dict[str, dict[str, object]] = {
    "model": {"quantization": "4bit"},
    "train": {"optimizer": "paged_adamw_8bit", "gradient_checkpointing": True},
}


def _train_child(tree: dict, results) -> None:
    """In the spawned process: train the config and report (run folder, seconds, peak RSS bytes)."""
    import resource

    from ..config_loading import validate_config
    from ..errors import LorakitError
    from ..train.recipe import train

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("lorakit.train", "lorakit.demo"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        started = time.perf_counter()
        paths = train(validate_config(tree))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        results.put(("ok", str(paths.root), time.perf_counter() - started, peak))
    except LorakitError as exc:
        results.put(("error", str(exc), 0.0, 0))
        raise


def _train_alone(config) -> tuple[str, float, int]:
    """Train in a fresh process of its own; (run folder, training seconds, its peak RSS in bytes).

    Raises:
        RunError: the training process failed (its error is in the message).
    """
    import multiprocessing

    from ..errors import RunError

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_train_child, args=(config.model_dump(mode="json"), results))
    process.start()
    process.join()
    if results.empty():
        raise RunError(f"the demo's training process exited with code {process.exitcode}.", hint="see its output above")
    status, value, seconds, peak = results.get()
    if status != "ok":
        raise RunError(f"the demo's training failed: {value}", hint="see its output above")
    return value, seconds, peak


def run_qlora_demo(workdir: str | Path = "runs/demo", quick: bool = False) -> dict:
    """The demo twice, 32-bit LoRA then 4-bit QLoRA, each trained and evaluated before/after.

    Args:
        workdir: the 32-bit run's folder; the QLoRA run goes beside it (`<workdir>-qlora`).
        quick: one epoch instead of three.

    Returns:
        {"runs": {"lora": ..., "qlora": ...}, "n_test": count, "times_s": {...}}, each run with
        before/after metrics, its training seconds and its training process's peak resident bytes.

    Raises:
        ModelError, MissingExtraError: the model cannot be obtained, or bitsandbytes cannot run here.
        LorakitError: anything the pipeline stages raise.
    """
    from ..evaluate.runner import evaluate_path
    from .end_to_end import demo_config
    from .hubless import ensure_smollm2

    started = time.perf_counter()
    model_dir = ensure_smollm2()
    workdir = Path(workdir)
    runs: dict[str, dict] = {}
    recipes: list[tuple[str, dict[str, dict[str, object]]]] = [("lora", {}), ("qlora", QLORA)]
    for name, changes in recipes:
        config = demo_config(
            model_dir, workdir if name == "lora" else workdir.with_name(f"{workdir.name}-qlora"), quick=quick
        )
        for section, values in changes.items():
            for key, value in values.items():
                setattr(getattr(config, section), key, value)
        what = "32-bit LoRA" if name == "lora" else "4-bit QLoRA (NF4, paged 8-bit AdamW, checkpointing)"
        logger.info(f"fine-tuning with {what}: {config.train.epochs:g} epochs, CPU")
        root, train_s, peak = _train_alone(config)
        logger.info(f"evaluating the {what} run on held-out articles: base model (adapter off), then fine-tuned")
        phase = time.perf_counter()
        summary = evaluate_path(root, split="test", compare_base=True, verbose=False)
        runs[name] = {
            "before": summary["base"],
            "after": summary["adapter"],
            "train_s": round(train_s, 1),
            "evaluate_s": round(time.perf_counter() - phase, 1),
            "peak_rss": peak,
            "run": root,
            "report": str(Path(summary["folder"]) / "report.md"),
            "n_test": summary["n"],
        }
    return {"runs": runs, "n_test": runs["lora"]["n_test"], "total_s": round(time.perf_counter() - started, 1)}


def format_qlora_table(result: dict) -> str:
    """The side-by-side table `lorakit demo --qlora` prints."""
    lora, qlora = result["runs"]["lora"], result["runs"]["qlora"]

    def gib(n: int) -> str:
        return f"{n / 2**30:.2f} GiB"

    def score(run: dict, when: str, key: str, unit: str = "") -> str:
        value = run[when].get(key)
        return "n/a" if value is None else f"{value:.1f}{unit}"

    rows = [
        ("peak memory of the training process (RSS)", gib(lora["peak_rss"]), gib(qlora["peak_rss"])),
        ("training time", f"{lora['train_s']:.0f} s", f"{qlora['train_s']:.0f} s"),
        ("evaluation time (before + after)", f"{lora['evaluate_s']:.0f} s", f"{qlora['evaluate_s']:.0f} s"),
        ("exact match before", score(lora, "before", "exact_match"), score(qlora, "before", "exact_match")),
        ("exact match after", score(lora, "after", "exact_match"), score(qlora, "after", "exact_match")),
        ("F1 before", score(lora, "before", "f1"), score(qlora, "before", "f1")),
        ("F1 after", score(lora, "after", "f1"), score(qlora, "after", "f1")),
        (
            "never stops (no EOS), after",
            score(lora, "after", "never_stops_rate", "%"),
            score(qlora, "after", "never_stops_rate", "%"),
        ),
    ]
    lines = [
        "",
        f"Held-out test set: {result['n_test']} questions on passages never trained on. "
        "Before = the base model (for QLoRA: the 4-bit base) with the adapter off.",
        "",
        "| | 32-bit LoRA | 4-bit QLoRA |",
        "|---|---|---|",
        *(f"| {name} | {a} | {b} |" for name, a, b in rows),
        "",
        f"wall time in all: {result['total_s']:.0f} s",
        f"reports: {lora['report']}, {qlora['report']}",
    ]
    return "\n".join(lines)
