"""Evaluation reports: files written, numbers consistent with the predictions, text escaped."""

import base64
import json
import re

import pytest

from lorakit.errors import EvalError
from lorakit.evaluate.metrics import corpus_metrics, score_example
from lorakit.evaluate.report import write_eval_outputs

EXAMPLES = [
    # id, question, references, base prediction, adapter prediction, adapter finish reason
    ("q1", "Where is the Eiffel Tower?", ["Paris", "in Paris"], "It is in France, I think", "Paris", "stop"),
    ("q2", "Who wrote it? <script>alert('x')</script>", ["Victor Hugo"], "Hugo", "Victor Hugo", "stop"),
    ("q3", "When was it built?", ["1889"], "1889", "in 1887 or so and more", "length"),
    ("q4", "پایتخت ایران کجاست؟", ["تهران"], "شهر تهران", "تهران", "stop"),
    ("q5", "Is there an answer?", [], "Yes, Lyon", "unanswerable", "stop"),
]


def _records(which):
    records = []
    for id_, question, refs, base, adapter, finish in EXAMPLES:
        prediction = adapter if which == "adapter" else base
        record = {
            "id": id_,
            "question": question,
            "context": "ctx " + id_,
            "references": refs,
            "prediction": prediction,
            "finish_reason": finish if which == "adapter" else "length",
        }
        record.update(score_example(prediction, refs, no_answer="unanswerable"))
        records.append(record)
    return records


def _metrics(records):
    return corpus_metrics(
        [r["prediction"] for r in records],
        [r["references"] for r in records],
        finish_reasons=[r["finish_reason"] for r in records],
    )


HISTORY = [
    {"step": 1, "loss": 2.5, "learning_rate": 1e-4},
    {"step": 2, "loss": 2.0},
    {"step": 2, "eval_loss": 2.2},
    {"step": 3, "loss": 1.4},
    {"step": 4, "loss": 1.1},
    {"step": 4, "eval_loss": 1.6},
]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    eval_dir = tmp_path_factory.mktemp("run") / "eval"
    adapter, base = _records("adapter"), _records("base")
    paths = write_eval_outputs(
        eval_dir,
        records=adapter,
        metrics=_metrics(adapter),
        base_records=base,
        base_metrics=_metrics(base),
        loss_history=HISTORY,
        title="demo <eval>",
    )
    return eval_dir, paths


def _markdown_row(markdown, label):
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in row.strip("|").split("|")][1:]


def test_every_documented_file_is_written(outputs):
    eval_dir, paths = outputs
    assert paths["predictions"] == eval_dir / "predictions.jsonl"
    for key in ("predictions", "metrics", "report_md", "report_html", "plot_loss", "plot_metrics"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    assert sorted(p.name for p in (eval_dir / "plots").iterdir()) == ["loss.png", "metrics.png"]
    assert (eval_dir / "plots" / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert not [p for p in eval_dir.rglob("*.tmp")]


def test_reported_numbers_are_what_the_predictions_imply(outputs):
    eval_dir, _ = outputs
    lines = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text("utf-8").splitlines()]
    summary = json.loads((eval_dir / "metrics.json").read_text("utf-8"))
    markdown = (eval_dir / "report.md").read_text("utf-8")
    assert summary["n"] == len(lines) == len(EXAMPLES)
    for key, label in (("exact_match", "Exact match"), ("f1", "F1")):
        adapter_mean = sum(line[key] for line in lines) / len(lines)
        base_mean = sum(line[f"base_{key}"] for line in lines) / len(lines)
        assert summary["adapter"][key] == pytest.approx(adapter_mean)
        assert summary["base"][key] == pytest.approx(base_mean)
        assert summary["delta"][key] == pytest.approx(adapter_mean - base_mean)
        base_cell, adapter_cell, delta_cell = _markdown_row(markdown, label)
        assert (base_cell, adapter_cell, delta_cell) == (
            f"{base_mean:.2f}",
            f"{adapter_mean:.2f}",
            f"{adapter_mean - base_mean:+.2f}",
        )
    never_stops = 100 * sum(line["finish_reason"] == "length" for line in lines) / len(lines)
    assert summary["adapter"]["never_stops_rate"] == pytest.approx(never_stops)
    assert _markdown_row(markdown, "Never stops (%)") == ["100.00", f"{never_stops:.2f}", f"{never_stops - 100:+.2f}"]
    # The unanswerable breakdown is in the table too.
    assert _markdown_row(markdown, "Unanswerable: Exact match")[1] == "100.00"


def test_prediction_lines_carry_everything(outputs):
    eval_dir, _ = outputs
    first = json.loads((eval_dir / "predictions.jsonl").read_text("utf-8").splitlines()[0])
    assert list(first)[:8] == [
        "id",
        "question",
        "context",
        "references",
        "prediction",
        "exact_match",
        "f1",
        "finish_reason",
    ]
    assert first["base_prediction"] == "It is in France, I think"
    assert first["context"] == "ctx q1" and first["references"] == ["Paris", "in Paris"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", first["timestamp"])
    persian = json.loads((eval_dir / "predictions.jsonl").read_text("utf-8").splitlines()[3])
    assert persian["question"] == "پایتخت ایران کجاست؟"


def test_markdown_lists_improved_and_worse_examples(outputs):
    eval_dir, _ = outputs
    markdown = (eval_dir / "report.md").read_text("utf-8")
    improved = markdown.split("## Examples that improved most")[1].split("## Examples that got worse")[0]
    worse = markdown.split("## Examples that got worse")[1]
    # q1 and q5 go from 0 to 100, q2 from 66.67 to 100, q4 from 66.67 to 100; q3 from 100 to 0.
    assert improved.index("q1") < improved.index("q2") and "q5" in improved and "q3" not in improved
    assert "### 1. q3" in worse and "- Base (F1 100.00): 1889" in worse
    assert "&lt;script&gt;" in markdown and "<script>" not in markdown


def test_html_is_self_contained_and_escaped(outputs):
    eval_dir, _ = outputs
    page = (eval_dir / "report.html").read_text("utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<title>demo &lt;eval&gt;</title>" in page
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from outside
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2
    assert base64.b64decode(images[0]) == (eval_dir / "plots" / "loss.png").read_bytes()
    assert 'dir="auto">پایتخت ایران کجاست؟' in page


def test_without_base_or_history(tmp_path):
    records = _records("adapter")
    paths = write_eval_outputs(tmp_path / "eval", records=records, metrics=_metrics(records))
    summary = json.loads(paths["metrics"].read_text("utf-8"))
    assert summary["base"] is None and summary["delta"] is None
    assert "plot_loss" not in paths and "plot_metrics" in paths
    markdown = paths["report_md"].read_text("utf-8")
    assert "| metric | value |" in markdown
    lowest = markdown.split("## Lowest-scoring examples")[1]
    assert "q3" in lowest and "q1" not in lowest  # only examples below 100 F1
    assert "no loss curve" in paths["report_html"].read_text("utf-8")


def test_inconsistent_inputs_are_refused(tmp_path):
    records = _records("adapter")
    with pytest.raises(ValueError, match="records average"):
        write_eval_outputs(tmp_path, records=records, metrics={**_metrics(records), "f1": 99.0})
    with pytest.raises(EvalError, match="records 0: the field 'f1' is missing"):
        write_eval_outputs(tmp_path, records=[{"prediction": "a", "references": [], "exact_match": 0}], metrics={})
    base = _records("base")[:3]
    with pytest.raises(EvalError, match="missing ids: q4, q5"):
        write_eval_outputs(tmp_path, records=records, metrics=_metrics(records), base_records=base)
    assert not (tmp_path / "metrics.json").exists()


def test_base_metrics_without_base_records(tmp_path):
    records, base = _records("adapter"), _records("base")
    paths = write_eval_outputs(tmp_path, records=records, metrics=_metrics(records), base_metrics=_metrics(base))
    assert "| metric | base | adapter | delta |" in paths["report_md"].read_text("utf-8")
    assert "Lowest-scoring examples" in paths["report_html"].read_text("utf-8")
