"""The self-contained report.html of an evaluation (plots inlined as PNG)."""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report_format import (
    BAR_METRICS,
    LABELS,
    _example_sections,
    _fmt,
    _fmt_delta,
    _is_number,
    _metric_rows,
    _one_line,
    _refs,
)


def _loss_plot(loss_history: Sequence[dict] | None, out_path: Path) -> bytes | None:
    """The run's loss curves (lorakit.plots.plot_loss), written atomically; None without history."""
    from .plots import plot_loss

    points = [
        r
        for r in loss_history or []
        if _is_number(r.get("step")) and (_is_number(r.get("loss")) or _is_number(r.get("eval_loss")))
    ]
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


def _metrics_plot(metrics: dict, base_metrics: dict | None) -> bytes | None:
    from .plots import metric_bars_png

    keys = [k for k in BAR_METRICS if _is_number(metrics.get(k))]
    if not keys:
        return None
    groups = [("adapter", metrics)] if base_metrics is None else [("base", base_metrics), ("adapter", metrics)]
    rows = [(name, [values.get(k) if _is_number(values.get(k)) else 0.0 for k in keys]) for name, values in groups]
    return metric_bars_png([LABELS[k] for k in keys], rows)


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
    head = (
        "<tr><th>metric</th><th>base</th><th>adapter</th><th>delta</th></tr>"
        if compared
        else "<tr><th>metric</th><th>value</th></tr>"
    )
    body = []
    for label, b, v in rows:
        cells = [f"<td>{html.escape(label)}</td>"]
        if compared:
            delta = _fmt_delta(b, v)
            css = "up" if delta.startswith("+") and delta != "+0.00" else "down" if delta.startswith("-") else ""
            cells += [
                f'<td class="num">{_fmt(b)}</td>',
                f'<td class="num">{_fmt(v)}</td>',
                f'<td class="num {css}">{delta}</td>',
            ]
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
    examples = "\n".join(
        _html_examples(heading, chosen, pairs[0][1] is not None) for heading, chosen in _example_sections(pairs, k)
    )
    tokenizer = metrics.get("bleu_tokenize")
    note = (
        "Exact match, F1, ROUGE and BLEU are on a 0-100 scale. Never stops: the share of answers "
        "that hit the token limit without an end-of-sequence token."
    )
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
