"""Evaluation outputs: predictions.jsonl, metrics.json, report.md, report.html and plots.

    eval/<split>-<time>/  (one folder per evaluation, see evaluate.history)
      predictions.jsonl   one line per example: question, references, prediction, scores
                          (and the base model's prediction and scores when compared)
      metrics.json        {"adapter": ..., "base": ... or null, "delta": ..., "n": ..., "created": ...,
                           "evaluation": what was evaluated and how}
      report.md           metrics before/after, then the examples that changed most
      report.html         the same, self-contained (inline CSS, plots as data URIs)
      plots/*.png         loss curves and metric bars

Every number in the reports is read from the records and metrics given, and the metrics must be
the means of the records' per-example scores, so a reader can recompute them from predictions.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import EvalError
from ..files import atomic_write_json, atomic_write_text
from .report_format import _delta, _is_number, _markdown
from .report_html import _html, _loss_plot, _metrics_plot

FIRST_KEYS = ("id", "question", "context", "references", "prediction", "exact_match", "f1", "finish_reason")
REQUIRED = ("prediction", "references", "exact_match", "f1")


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


def _check_records(records: Sequence[dict], name: str) -> None:
    if not records:
        raise EvalError(f"There are no {name} to report.", hint="evaluate at least one example.")
    for index, record in enumerate(records):
        for key in REQUIRED:
            if key not in record:
                raise EvalError(
                    f"{name} {index}: the field {key!r} is missing.",
                    hint="score each record with lorakit.evaluate.metrics.score_example first.",
                )


def _check_means(records: Sequence[dict], metrics: dict | None, name: str) -> None:
    """Refuse to write a report whose headline numbers the predictions do not imply."""
    if not metrics:
        return
    for key in ("exact_match", "f1"):
        if _is_number(metrics.get(key)):
            mean = sum(record[key] for record in records) / len(records)
            if abs(mean - metrics[key]) > 1e-6:
                raise ValueError(f"{name} metrics say {key}={metrics[key]} but the records average {mean}")


def _pair(records: Sequence[dict], base_records: Sequence[dict] | None) -> list[tuple[dict, dict | None]]:
    """Match each record with the base model's record for the same example: by id when every
    record has a distinct id, else by position."""
    if base_records is None:
        return [(record, None) for record in records]
    ids = [record.get("id") for record in records]
    base_ids = [record.get("id") for record in base_records]
    by_id = None not in ids and None not in base_ids
    by_id = by_id and len(set(ids)) == len(ids) and len(set(base_ids)) == len(base_ids)
    if by_id:
        base_by_id = {record["id"]: record for record in base_records}
        missing = [str(i) for i in ids if i not in base_by_id]
        if missing or len(base_ids) != len(ids):
            raise EvalError(
                f"The base model's predictions do not cover the same examples (missing ids: "
                f"{', '.join(missing[:5]) or 'none'}; {len(base_ids)} base vs {len(ids)} adapter records).",
                hint="generate base and adapter predictions on the same examples.",
            )
        return [(record, base_by_id[record["id"]]) for record in records]
    if len(base_records) != len(records):
        raise EvalError(
            f"There are {len(records)} adapter records but {len(base_records)} base records.",
            hint="generate base and adapter predictions on the same examples, in the same order.",
        )
    return list(zip(records, base_records))


def _prediction_line(record: dict, base: dict | None, created: str) -> dict:
    line = {key: record.get(key) for key in FIRST_KEYS}
    line.update({key: value for key, value in record.items() if key not in line})
    if base is not None:
        for key in ("prediction", "exact_match", "f1", "finish_reason"):
            line[f"base_{key}"] = base.get(key)
    line["timestamp"] = created
    return line


# --- markdown ----------------------------------------------------------------------------------


# --- plots -------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- html --------------------------------------------------------------------------------------


# --- the one public function -------------------------------------------------------------------


def write_eval_outputs(
    eval_dir: str | os.PathLike,
    *,
    records: Sequence[dict],
    metrics: dict,
    base_records: Sequence[dict] | None = None,
    base_metrics: dict | None = None,
    loss_history: Sequence[dict] | None = None,
    title: str = "lorakit evaluation",
    examples_shown: int = 10,
    about: dict | None = None,
) -> dict[str, Path]:
    """Write every evaluation output into `eval_dir`, each file atomically.

    records: one dict per example with `prediction`, `references`, `exact_match` and `f1`
        (from metrics.score_example, 0-100), and usually `id`, `question`, `context`,
        `finish_reason`; any other keys are kept in predictions.jsonl.
    metrics: corpus_metrics() of those records. base_records/base_metrics: the same for the base
        model (records matched by id, or by position when ids are missing or repeated).
    loss_history: the lines of the run's metrics.jsonl (step, loss and/or eval_loss).
    about: what was evaluated and how (model, split or data, decoding), kept in metrics.json
        as "evaluation" so each kept evaluation describes itself.
    Returns the written paths: predictions, metrics, report_md, report_html, and plot_loss /
    plot_metrics when drawn.
    """
    _check_records(records, "records")
    if base_records is not None:
        _check_records(base_records, "base records")
    _check_means(records, metrics, "adapter")
    if base_records is not None:
        _check_means(base_records, base_metrics, "base")
    eval_dir = Path(eval_dir)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    pairs = _pair(records, base_records)

    lines = [json.dumps(_finite(_prediction_line(r, b, created)), ensure_ascii=False) for r, b in pairs]
    paths = {"predictions": atomic_write_text(eval_dir / "predictions.jsonl", "\n".join(lines) + "\n")}
    summary = {
        "adapter": metrics,
        "base": base_metrics,
        "delta": _delta(metrics, base_metrics),
        "n": len(records),
        "created": created,
    }
    if about is not None:
        summary["evaluation"] = about
    paths["metrics"] = atomic_write_json(eval_dir / "metrics.json", _finite(summary))

    plots = {}
    loss_png = _loss_plot(loss_history, eval_dir / "plots" / "loss.png")
    if loss_png is not None:
        plots["loss"], paths["plot_loss"] = loss_png, eval_dir / "plots" / "loss.png"
    metrics_png = _metrics_plot(metrics, base_metrics)
    if metrics_png is not None:
        plots["metrics"] = metrics_png
        paths["plot_metrics"] = _atomic_write_bytes(eval_dir / "plots" / "metrics.png", metrics_png)

    markdown = _markdown(title, created, metrics, base_metrics, pairs, examples_shown)
    paths["report_md"] = atomic_write_text(eval_dir / "report.md", markdown)
    page = _html(title, created, metrics, base_metrics, pairs, examples_shown, plots)
    paths["report_html"] = atomic_write_text(eval_dir / "report.html", page)
    return paths
