"""The rows and cells of an evaluation report, shared by report.md and report.html: metric rows,
deltas against the base model, number formatting, the examples shown."""

from __future__ import annotations

import html
import math
from typing import Any

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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _delta(adapter: dict, base: dict | None) -> dict | None:
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


def _metric_rows(metrics: dict, base: dict | None) -> list[tuple[str, Any, Any]]:
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


def _example_sections(pairs: list[tuple[dict, dict | None]], k: int) -> list[tuple[str, list]]:
    """(heading, [(record, base)]): the k examples that improved most and the k that got worse,
    by F1; without a base model, the k lowest-scoring examples."""
    if pairs[0][1] is None:
        lowest = sorted(pairs, key=lambda pair: pair[0]["f1"])[:k]
        return [("Lowest-scoring examples (by F1)", [pair for pair in lowest if pair[0]["f1"] < 100.0])]
    deltas = [(record["f1"] - base["f1"], (record, base)) for record, base in pairs]
    improved = sorted((d for d in deltas if d[0] > 0), key=lambda d: -d[0])[:k]
    worse = sorted((d for d in deltas if d[0] < 0), key=lambda d: d[0])[:k]
    return [
        ("Examples that improved most (by F1)", [pair for _, pair in improved]),
        ("Examples that got worse (by F1)", [pair for _, pair in worse]),
    ]


def _one_line(text: Any, limit: int = 400) -> str:
    text = " ".join(str(text if text is not None else "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _refs(record: dict) -> str:
    refs = record.get("references") or []
    return " | ".join(_one_line(ref, 200) for ref in refs) if refs else "(unanswerable)"


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
    lines += [
        "",
        "Exact match, F1, ROUGE and BLEU are on a 0-100 scale. Never stops: the share of "
        "answers that hit the token limit without an end-of-sequence token.",
    ]
    if metrics.get("bleu_tokenize"):
        lines.append(f"BLEU tokenizer: `{metrics['bleu_tokenize']}`.")
    for heading, chosen in _example_sections(pairs, k):
        lines += ["", f"## {heading}", ""]
        if not chosen:
            lines.append("None.")
        for number, (record, base) in enumerate(chosen, 1):
            lines += [
                f"### {number}. {_md(record.get('id', ''))}",
                "",
                f"- Question: {_md(record.get('question'))}",
                f"- References: {_md(_refs(record))}",
            ]
            if base is not None:
                lines.append(f"- Base (F1 {_fmt(base['f1'])}): {_md(base['prediction'])}")
            lines += [f"- Adapter (F1 {_fmt(record['f1'])}): {_md(record['prediction'])}", ""]
    return "\n".join(lines).rstrip() + "\n"
