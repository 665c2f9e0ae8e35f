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

import base64
import html
import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import EvalError
from ..runs import atomic_write_json, atomic_write_text

LABELS = {
    "n": "Examples",
    "exact_match": "Exact match",
    "f1": "F1",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "bleu": "BLEU",
    "never_stops_rate": "Never stops (%)",
    "perplexity": "Reference perplexity",
    "has_answer": "Answerable",
    "no_answer": "Unanswerable",
}
BAR_METRICS = ("exact_match", "f1", "rougeL", "bleu", "never_stops_rate")
FIRST_KEYS = ("id", "question", "context", "references", "prediction", "exact_match", "f1", "finish_reason")
REQUIRED = ("prediction", "references", "exact_match", "f1")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def _check_means(records: Sequence[dict], metrics: Optional[dict], name: str) -> None:
    """Refuse to write a report whose headline numbers the predictions do not imply."""
    if not metrics:
        return
    for key in ("exact_match", "f1"):
        if _is_number(metrics.get(key)):
            mean = sum(record[key] for record in records) / len(records)
            if abs(mean - metrics[key]) > 1e-6:
                raise ValueError(f"{name} metrics say {key}={metrics[key]} but the records average {mean}")


def _pair(records: Sequence[dict], base_records: Optional[Sequence[dict]]) -> list[tuple[dict, Optional[dict]]]:
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


def _prediction_line(record: dict, base: Optional[dict], created: str) -> dict:
    line = {key: record.get(key) for key in FIRST_KEYS}
    line.update({key: value for key, value in record.items() if key not in line})
    if base is not None:
        for key in ("prediction", "exact_match", "f1", "finish_reason"):
            line[f"base_{key}"] = base.get(key)
    line["timestamp"] = created
    return line


def _delta(adapter: dict, base: Optional[dict]) -> Optional[dict]:
    """adapter - base for every number both have (nested breakdowns included)."""
    if base is None:
        return None
    out = {}
    for key, value in adapter.items():
        other = base.get(key)
        if isinstance(value, dict) and isinstance(other, dict):
            out[key] = _delta(value, other)
        elif _is_number(value) and _is_number(other) and key != "n":
            out[key] = value - other
    return out


def _metric_rows(metrics: dict, base: Optional[dict]) -> list[tuple[str, Any, Any]]:
    """(label, base value, adapter value) for every number, in a stable reading order."""
    rows = []
    keys = [k for k in LABELS if k in metrics] + sorted(k for k in metrics if k not in LABELS)
    for key in keys:
        value = metrics[key]
        other = (base or {}).get(key)
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                sub_other = other.get(sub) if isinstance(other, dict) else None
                if _is_number(sub_value) or sub_value is None:
                    rows.append((f"{LABELS.get(key, key)}: {LABELS.get(sub, sub)}", sub_other, sub_value))
        elif _is_number(value) or (value is None and key in LABELS):
            rows.append((LABELS.get(key, key), other, value))
    return rows


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}"


def _fmt_delta(base: Any, value: Any) -> str:
    if not (_is_number(base) and _is_number(value)):
        return "—"
    if isinstance(base, int) and isinstance(value, int):
        return "—"  # counts (n) have no meaningful delta
    return f"{value - base:+.2f}"


def _example_sections(pairs: list[tuple[dict, Optional[dict]]], k: int) -> list[tuple[str, list]]:
    """(heading, [(record, base)]): the k examples that improved most and the k that got worse,
    by F1; without a base model, the k lowest-scoring examples."""
    if pairs[0][1] is None:
        lowest = sorted(pairs, key=lambda pair: pair[0]["f1"])[:k]
        return [("Lowest-scoring examples (by F1)", [pair for pair in lowest if pair[0]["f1"] < 100.0])]
    deltas = [(record["f1"] - base["f1"], (record, base)) for record, base in pairs]
    improved = sorted((d for d in deltas if d[0] > 0), key=lambda d: -d[0])[:k]
    worse = sorted((d for d in deltas if d[0] < 0), key=lambda d: d[0])[:k]
    return [("Examples that improved most (by F1)", [pair for _, pair in improved]),
            ("Examples that got worse (by F1)", [pair for _, pair in worse])]


def _one_line(text: Any, limit: int = 400) -> str:
    text = " ".join(str(text if text is not None else "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _refs(record: dict) -> str:
    refs = record.get("references") or []
    return " | ".join(_one_line(ref, 200) for ref in refs) if refs else "(unanswerable)"


# --- markdown ----------------------------------------------------------------------------------


def _md(text: Any, limit: int = 400) -> str:
    # Escaped so that text from the data cannot inject HTML into a rendered markdown page.
    return html.escape(_one_line(text, limit), quote=False).replace("|", "\\|")


def _markdown(title, created, metrics, base_metrics, pairs, k) -> str:
    lines = [f"# {_md(title)}", "", f"Created {created}; {len(pairs)} examples.", "", "## Metrics", ""]
    rows = _metric_rows(metrics, base_metrics)
    if base_metrics is not None:
        lines += ["| metric | base | adapter | delta |", "|---|---:|---:|---:|"]
        lines += [f"| {label} | {_fmt(b)} | {_fmt(v)} | {_fmt_delta(b, v)} |" for label, b, v in rows]
    else:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {label} | {_fmt(v)} |" for label, _, v in rows]
    lines += ["", "Exact match, F1, ROUGE and BLEU are on a 0-100 scale. Never stops: the share of "
              "answers that hit the token limit without an end-of-sequence token."]
    if metrics.get("bleu_tokenize"):
        lines.append(f"BLEU tokenizer: `{metrics['bleu_tokenize']}`.")
    for heading, chosen in _example_sections(pairs, k):
        lines += ["", f"## {heading}", ""]
        if not chosen:
            lines.append("None.")
        for number, (record, base) in enumerate(chosen, 1):
            lines += [f"### {number}. {_md(record.get('id', ''))}", "",
                      f"- Question: {_md(record.get('question'))}",
                      f"- References: {_md(_refs(record))}"]
            if base is not None:
                lines.append(f"- Base (F1 {_fmt(base['f1'])}): {_md(base['prediction'])}")
            lines += [f"- Adapter (F1 {_fmt(record['f1'])}): {_md(record['prediction'])}", ""]
    return "\n".join(lines).rstrip() + "\n"


# --- plots -------------------------------------------------------------------------------------


def _loss_plot(loss_history: Optional[Sequence[dict]], out_path: Path) -> Optional[bytes]:
    """The run's loss curves (lorakit.plots.plot_loss), written atomically; None without history."""
    from ..plots import plot_loss

    points = [r for r in loss_history or [] if _is_number(r.get("step"))
              and (_is_number(r.get("loss")) or _is_number(r.get("eval_loss")))]
    if not points:
        return None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.{os.getpid()}.tmp.png")  # .png: savefig picks the format
    try:
        plot_loss(points, tmp)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path.read_bytes()


def _metrics_plot(metrics: dict, base_metrics: Optional[dict]) -> Optional[bytes]:
    from ..plots import metric_bars_png

    keys = [k for k in BAR_METRICS if _is_number(metrics.get(k))]
    if not keys:
        return None
    groups = [("adapter", metrics)] if base_metrics is None else [("base", base_metrics), ("adapter", metrics)]
    rows = [(name, [values.get(k) if _is_number(values.get(k)) else 0.0 for k in keys]) for name, values in groups]
    return metric_bars_png([LABELS[k] for k in keys], rows)


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

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: .35rem .6rem; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.up { color: #176b2c; } .down { color: #a31515; }
img { max-width: 100%; }
.note { color: #555; font-size: .9rem; }
"""


def _h(text: Any, limit: int = 400) -> str:
    return html.escape(_one_line(text, limit))


def _html_examples(heading: str, chosen: list, compared: bool) -> str:
    parts = [f"<h2>{html.escape(heading)}</h2>"]
    if not chosen:
        return parts[0] + "<p>None.</p>"
    head = "<th>#</th><th>id</th><th>question</th><th>references</th>"
    head += "<th>base</th><th>adapter</th><th>F1 base → adapter</th>" if compared else "<th>prediction</th><th>F1</th>"
    parts.append(f"<table><tr>{head}</tr>")
    for number, (record, base) in enumerate(chosen, 1):
        cells = [str(number), _h(record.get("id", "")), _h(record.get("question")), _h(_refs(record))]
        if compared:
            cells += [_h(base["prediction"]), _h(record["prediction"]), f"{_fmt(base['f1'])} → {_fmt(record['f1'])}"]
        else:
            cells += [_h(record["prediction"]), _fmt(record["f1"])]
        parts.append("<tr>" + "".join(f'<td dir="auto">{cell}</td>' for cell in cells) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _html(title, created, metrics, base_metrics, pairs, k, plots: dict[str, bytes]) -> str:
    rows = _metric_rows(metrics, base_metrics)
    compared = base_metrics is not None
    head = "<tr><th>metric</th><th>base</th><th>adapter</th><th>delta</th></tr>" if compared else \
        "<tr><th>metric</th><th>value</th></tr>"
    body = []
    for label, b, v in rows:
        cells = [f"<td>{html.escape(label)}</td>"]
        if compared:
            delta = _fmt_delta(b, v)
            css = "up" if delta.startswith("+") and delta != "+0.00" else "down" if delta.startswith("-") else ""
            cells += [f'<td class="num">{_fmt(b)}</td>', f'<td class="num">{_fmt(v)}</td>',
                      f'<td class="num {css}">{delta}</td>']
        else:
            cells.append(f'<td class="num">{_fmt(v)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode("ascii")}"></figure>'
        for name, data in plots.items()
    )
    if "loss" not in plots:
        images = '<p class="note">No training history was given, so there is no loss curve.</p>' + images
    examples = "\n".join(_html_examples(heading, chosen, pairs[0][1] is not None)
                         for heading, chosen in _example_sections(pairs, k))
    tokenizer = metrics.get("bleu_tokenize")
    note = "Exact match, F1, ROUGE and BLEU are on a 0-100 scale. Never stops: the share of answers " \
           "that hit the token limit without an end-of-sequence token."
    if tokenizer:
        note += f" BLEU tokenizer: {html.escape(str(tokenizer))}."
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_h(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{_h(title)}</h1>
<p class="note">Created {html.escape(created)}; {len(pairs)} examples.</p>
<h2>Metrics</h2>
<table>{head}
{chr(10).join(body)}
</table>
<p class="note">{note}</p>
<h2>Plots</h2>
{images}
{examples}
</body></html>
"""


# --- the one public function -------------------------------------------------------------------


def write_eval_outputs(
    eval_dir: str | os.PathLike,
    *,
    records: Sequence[dict],
    metrics: dict,
    base_records: Optional[Sequence[dict]] = None,
    base_metrics: Optional[dict] = None,
    loss_history: Optional[Sequence[dict]] = None,
    title: str = "lorakit evaluation",
    examples_shown: int = 10,
    about: Optional[dict] = None,
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
    summary = {"adapter": metrics, "base": base_metrics, "delta": _delta(metrics, base_metrics),
               "n": len(records), "created": created}
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
