"""Where evaluations go: each one is kept, none replaces another.

    runs/<name>/eval/
      index.json                  every evaluation below, oldest first, and the newest ("latest")
      test-20260101T120000Z/      predictions.jsonl, metrics.json, report.md, report.html, plots/
      validation-20260101T120500Z/
      extra-20260101T121000Z-2/   (--data extra.json; "-2": a second one in the same second)

`lorakit eval --out DIR` writes exactly DIR instead (which must not exist, or be empty) and leaves
the run's eval/ alone. Either way the outputs are written into a hidden temporary folder first and
renamed into place only when complete, so a failed or interrupted evaluation changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from itertools import count
from pathlib import Path

from ..errors import EvalError
from ..files import atomic_write_json

INDEX = "index.json"
HEADLINE = ("exact_match", "f1", "rougeL", "bleu", "never_stops_rate", "perplexity")


def label_for(split: str, data: str | None) -> str:
    """The first part of an evaluation's folder name: the split, or the data file's name."""
    if data is None:
        return split
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(data).stem).strip("-.") or "data"


def check_out_dir(out: Path) -> None:
    """--out must be a new or empty folder: an evaluation never replaces files the user has.

    Raises:
        EvalError: out is a file, or a folder that is not empty.
    """
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out '{out}' is a file.", hint="give a folder path that does not exist yet")
    if out.is_dir() and any(out.iterdir()):
        raise EvalError(
            f"--out '{out}' already exists and is not empty; an evaluation never replaces files.",
            hint="give a new folder, or leave out --out to keep every evaluation in the run's eval/ folder",
        )


@contextmanager
def staging(parent: Path) -> Iterator[Path]:
    """A hidden temporary folder under `parent` to write into; removed unless it was renamed away."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".eval-tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_new(tmp: Path, eval_root: Path, label: str, now: datetime | None = None) -> Path:
    """Rename the finished folder to eval_root/<label>-<UTC time>[-N]/, a name no one else holds.

    A rename onto a folder that already has content fails, so two evaluations finishing in the
    same second (even in two processes) get two folders.
    """
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    for number in count(1):
        final = eval_root / (f"{label}-{stamp}" if number == 1 else f"{label}-{stamp}-{number}")
        if final.exists():
            continue
        try:
            os.rename(tmp, final)
            return final
        except OSError:
            if not final.exists():  # the failure was not a name taken meanwhile
                raise
    raise AssertionError("unreachable")


def publish_to(tmp: Path, out: Path) -> Path:
    """Rename the finished folder to --out (checked new or empty before evaluating).

    Raises:
        EvalError: something filled --out while the evaluation ran (the results stay in tmp's place).
    """
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        os.rename(tmp, out)
        return out
    except OSError:
        kept = tmp.with_name(f"{out.name}-{uuid.uuid4().hex[:6]}")
        os.rename(tmp, kept)
        raise EvalError(
            f"--out '{out}' was created by something else while evaluating; the results were written to '{kept}'.",
            hint="use those results, or evaluate again with a new --out folder",
        ) from None


def _entry(folder: str, summary: dict) -> dict:
    about = summary.get("evaluation") or {}

    def headline(metrics: dict | None) -> dict | None:
        return {key: metrics.get(key) for key in HEADLINE} if isinstance(metrics, dict) else None

    return {
        "folder": folder,
        "created": summary.get("created"),
        "split": about.get("split"),
        "data": about.get("data"),
        "n": summary.get("n"),
        "adapter": headline(summary.get("adapter")),
        "base": headline(summary.get("base")),
    }


def list_evaluations(eval_root: Path) -> list[dict]:
    """Every complete evaluation under eval_root (one whose metrics.json reads), oldest first; an
    evaluation written by an older lorakit straight into eval/ is listed as folder '.'."""
    found = [eval_root / "metrics.json"] + sorted(eval_root.glob("*/metrics.json"))
    entries = []
    for metrics_file in found:
        folder = metrics_file.parent
        if folder.name.startswith(".") and folder != eval_root:
            continue  # a temporary folder of an evaluation still running (or killed)
        try:
            summary = json.loads(metrics_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(summary, dict):
            entries.append(_entry("." if folder == eval_root else folder.name, summary))
    return sorted(entries, key=lambda e: (str(e["created"] or ""), e["folder"]))


def write_index(eval_root: Path, latest: str) -> Path:
    """eval/index.json, rebuilt from the folders themselves, so two evaluations finishing at once
    cannot drop each other's entry."""
    return atomic_write_json(eval_root / INDEX, {"latest": latest, "evaluations": list_evaluations(eval_root)})


def latest_evaluation(eval_root: Path) -> Path | None:
    """The folder of the newest evaluation recorded in eval/index.json (None if there is none)."""
    try:
        latest = json.loads((eval_root / INDEX).read_text(encoding="utf-8")).get("latest")
    except (OSError, ValueError, AttributeError):
        return None
    return eval_root / latest if isinstance(latest, str) and (eval_root / latest).is_dir() else None


def summary_lines(summary: dict, folder: str | os.PathLike, index: str | os.PathLike | None = None) -> list[str]:
    """The lines `lorakit eval` and `lorakit score` print for a result of evaluate_path or score_predictions.

    Args:
        summary: what evaluate_path or score_predictions returned (n, adapter, base metrics).
        folder: where the outputs were written.
        index: the run's eval/index.json, when the evaluation was added to it.

    Returns:
        The lines, without newlines: counts, headline metrics (and the base's), where the files are.
    """

    def line(name: str, m: dict) -> str:
        text = f"{name}: EM {m['exact_match']:.1f}  F1 {m['f1']:.1f}  ROUGE-L {m['rougeL']:.1f}"
        if m.get("never_stops_rate") is not None:
            text += f"  never-stops {m['never_stops_rate']:.1f}%"
        if m.get("perplexity") is not None:
            text += f"  reference perplexity {m['perplexity']:.2f}"
        return text

    lines = [f"{summary['n']} examples", line("adapter" if summary.get("base") else "model", summary["adapter"])]
    if summary.get("base"):
        lines.append(line("base", summary["base"]))
    lines.append(f"written: {folder}/ (predictions.jsonl, metrics.json, report.md, report.html)")
    if index is not None:
        lines.append(f"every evaluation of this run: {index}")
    return lines
