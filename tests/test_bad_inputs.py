"""A corpus of bad inputs driven through the CLI: each one is reported as one line
`error: ... Fix: ...`, exits 2, shows no traceback, and writes or removes nothing.

Each case is a function that writes its inputs into a fresh folder and returns the argv.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lorakit.cli import main

QA = [{"question": f"What is {i}?", "answer": f"It is {i}."} for i in range(8)]
QA_JSONL = "".join(json.dumps(r) + "\n" for r in QA)


def config_text(data: str, model: str, out: str, extra: str = "") -> str:
    return (
        f"data:\n  path: {data}\nmodel:\n  name_or_path: {model}\ntrain:\n  output_dir: {out}\n  max_steps: 1\n{extra}"
    )


class Case:
    """Files and the command of one bad input; `model` is the tiny model folder."""

    def __init__(self, root: Path, model: Path):
        self.root, self.model = root, model

    def file(self, name: str, content) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def config(self, extra: str = "", *, data: str | None = None, model: str | None = None, name="config.yaml") -> Path:
        data = data or str(self.file("good.jsonl", QA_JSONL))
        return self.file(name, config_text(data, model or str(self.model), str(self.root / "runs"), extra))

    def inspect(self, name: str, content, *sets: str) -> list[str]:
        """`lorakit data inspect` on a data file holding `content`."""
        data = self.file(name, content)
        argv = ["data", "inspect", str(self.config(data=str(data)))]
        for item in sets:
            argv += ["--set", item]
        return argv

    def train(self, extra: str = "", *sets: str, **paths) -> list[str]:
        argv = ["train", str(self.config(extra, **paths))]
        for item in sets:
            argv += ["--set", item]
        return argv

    def broken_model(self, damage) -> str:
        """A copy of the tiny model with `damage(folder)` applied."""
        folder = self.root / "model"
        shutil.copytree(self.model, folder)
        damage(folder)
        return str(folder)


def _parquet(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(
        pa.Table.from_pylist(rows, schema=pa.schema([("question", pa.string()), ("answer", pa.string())])), buffer
    )
    return buffer.getvalue()


def _truncate(folder: Path, keep=lambda n: n // 2):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: keep(len(data))])


QA_JSON = json.dumps(QA)
BROKEN_JSON = '{"model": {'
SQUAD_NO_QAS = json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "c"}]}]})

CASES = {
    # --- JSON data files ---
    "json-malformed": lambda c: c.inspect("d.json", '[{"question": "a" "answer": "b"}]'),
    "json-truncated": lambda c: c.inspect("d.json", QA_JSON[:-40]),
    "json-utf16": lambda c: c.inspect("d.json", QA_JSON.encode("utf-16")),
    "json-utf16-no-bom": lambda c: c.inspect("d.json", QA_JSON.encode("utf-16-le")),
    "json-utf32": lambda c: c.inspect("d.json", QA_JSON.encode("utf-32")),
    "json-empty": lambda c: c.inspect("d.json", ""),
    "json-whitespace": lambda c: c.inspect("d.json", " \n\n"),
    "json-empty-list": lambda c: c.inspect("d.json", "[]"),
    "json-deep": lambda c: c.inspect("d.json", "[" * 100_000 + "]" * 100_000),
    "json-huge-number": lambda c: c.inspect("d.json", '[{"question": "q", "answer": ' + "9" * 5000 + "}]"),
    "json-top-level-number": lambda c: c.inspect("d.json", "42"),
    "json-list-of-strings": lambda c: c.inspect("d.json", '["a", "b"]'),
    "json-unknown-keys": lambda c: c.inspect("d.json", '[{"foo": 1, "bar": 2}]'),
    "json-two-record-lists": lambda c: c.inspect("d.json", '{"a": [{"question": "q"}], "b": [{"answer": "a"}]}'),
    "json-wrapped-empty": lambda c: c.inspect("d.json", '{"data": []}'),
    "json-field-is-object": lambda c: c.inspect("d.json", '[{"question": {"x": 1}, "answer": "a"}]'),
    "json-every-answer-empty": lambda c: c.inspect(
        "d.json", '[{"question": "q", "answer": ""}, {"question": "r", "answer": " "}]'
    ),
    "squad-no-qas": lambda c: c.inspect("d.json", SQUAD_NO_QAS),
    "squad-answers-not-list": lambda c: c.inspect(
        "d.json",
        json.dumps(
            {"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": "x"}]}]}]}
        ),
    ),
    "sharegpt-unknown-role": lambda c: c.inspect("d.json", '[{"conversations": [{"from": "robot", "value": "hi"}]}]'),
    "messages-not-a-list": lambda c: c.inspect("d.json", '[{"messages": "hi"}]'),
    "alpaca-bad-history": lambda c: c.inspect("d.json", '[{"instruction": "i", "output": "o", "history": "h"}]'),
    # --- JSON Lines ---
    "jsonl-malformed-line": lambda c: c.inspect("d.jsonl", '{"question": "a", "answer": "b"}\n{"question": "c", \n'),
    "jsonl-array-line": lambda c: c.inspect("d.jsonl", '{"question": "a", "answer": "b"}\n[1, 2]\n'),
    "jsonl-string-line": lambda c: c.inspect("d.jsonl", '"text"\n'),
    "jsonl-empty": lambda c: c.inspect("d.jsonl", ""),
    "jsonl-utf16": lambda c: c.inspect("d.jsonl", QA_JSONL.encode("utf-16")),
    "jsonl-huge-number": lambda c: c.inspect("d.jsonl", QA_JSONL + '{"question": "q", "answer": ' + "1" * 5000 + "}\n"),
    "jsonl-deep": lambda c: c.inspect("d.jsonl", '{"question": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
    # --- CSV / TSV ---
    "csv-ragged-row": lambda c: c.inspect("d.csv", "question,answer\nq1,a1\nq2,a2,extra\n"),
    "csv-short-row": lambda c: c.inspect("d.csv", "question,answer,context\nq1,a1,c1\nq2,a2\n"),
    "csv-empty": lambda c: c.inspect("d.csv", ""),
    "csv-header-only": lambda c: c.inspect("d.csv", "question,answer\n"),
    "csv-utf16": lambda c: c.inspect("d.csv", "question,answer\nq,a\n".encode("utf-16")),
    "csv-no-qa-columns": lambda c: c.inspect("d.csv", "foo,bar\n1,2\n"),
    "csv-unparsable-answers": lambda c: c.inspect("d.csv", 'question,context,answers\nq,c,"[unclosed"\n'),
    "tsv-ragged-row": lambda c: c.inspect("d.tsv", "question\tanswer\nq\ta\tb\n"),
    "tsv-header-only": lambda c: c.inspect("d.tsv", "question\tanswer\n"),
    # --- Parquet and other containers ---
    "parquet-garbage": lambda c: c.inspect("d.parquet", b"this is not parquet"),
    "parquet-truncated": lambda c: c.inspect("d.parquet", _parquet(QA)[:200]),
    "parquet-no-rows": lambda c: c.inspect("d.parquet", _parquet([])),
    "data-unknown-suffix": lambda c: c.inspect("d.txt", "question: a"),
    "data-missing-file": lambda c: c.inspect("d.jsonl", QA_JSONL, f"data.path={c.root / 'missing.jsonl'}"),
    "data-folder-not-dataset": lambda c: c.inspect("folder/d.jsonl", QA_JSONL, f"data.path={c.root / 'folder'}"),
    "data-format-mismatch": lambda c: c.inspect("d.jsonl", QA_JSONL, "data.format=squad"),
    "column-map-unknown-field": lambda c: c.inspect("d.jsonl", QA_JSONL, "data.column_map={questn: question}"),
    "column-map-missing-column": lambda c: c.inspect(
        "d.jsonl", QA_JSONL, "data.column_map={question: Q, answer: answer}"
    ),
    "validation-file-missing": lambda c: c.inspect(
        "d.jsonl", QA_JSONL, f"data.validation_path={c.root / 'nope.jsonl'}"
    ),
    # --- config files and values (train: nothing may be written before the config is checked) ---
    "config-latin1": lambda c: [
        "train",
        str(c.file("c.yaml", config_text("d.jsonl", "m", "r", "# caf\xe9\n").encode("latin-1"))),
    ],
    "config-utf16": lambda c: ["train", str(c.file("c.yaml", config_text("d.jsonl", "m", "r").encode("utf-16")))],
    "config-invalid-yaml": lambda c: ["train", str(c.file("c.yaml", "data:\n  path: [unclosed\nmodel: x\n"))],
    "config-top-level-list": lambda c: ["train", str(c.file("c.yaml", "- data\n- model\n"))],
    "config-is-a-folder": lambda c: ["train", str(c.root)],
    "config-missing": lambda c: ["train", str(c.root / "nope.yaml")],
    "config-missing-data-path": lambda c: ["train", str(c.file("c.yaml", "model:\n  name_or_path: m\n"))],
    "config-unknown-key": lambda c: c.train("  lerning_rate: 0.1\n"),
    "config-wrong-type": lambda c: c.train("  epochs: many\n"),
    "config-out-of-range": lambda c: c.train("", "lora.r=0"),
    "config-split-sum": lambda c: c.train("", "data.split.train=0.5"),
    "config-unknown-format": lambda c: c.train("", "data.format=xml"),
    "config-report-to": lambda c: c.train("  report_to: [nonsense]\n"),
    "config-report-to-typo": lambda c: c.train("", "train.report_to=[tensorbord]"),
    "config-optimizer": lambda c: c.train("", "train.optimizer=adamw_fancy"),
    "config-lr-scheduler": lambda c: c.train("", "train.lr_scheduler=cosin"),
    "config-best-metric-unknown": lambda c: c.train("", "train.best_metric=eval_accuracy"),
    "config-best-metric-needs-generation": lambda c: c.train("", "train.best_metric=eval_f1"),
    "config-save-not-multiple-of-eval": lambda c: c.train("", "train.eval_every=4", "train.save_every=6"),
    "config-bleu-tokenize": lambda c: c.train("", "eval.bleu_tokenize=klingon"),
    "config-learning-rate-inf": lambda c: c.train("", "train.learning_rate=.inf"),
    "config-learning-rate-nan": lambda c: c.train("", "train.learning_rate=.nan"),
    "config-output-dir-is-file": lambda c: c.train("", f"train.output_dir={c.file('afile', 'x')}"),
    "config-output-dir-under-file": lambda c: c.train("", f"train.output_dir={c.file('afile', 'x')}/runs"),
    # --- model folders ---
    "model-missing": lambda c: c.inspect("d.jsonl", QA_JSONL, f"model.name_or_path={c.root / 'nomodel'}"),
    "model-is-a-file": lambda c: c.inspect("d.jsonl", QA_JSONL, f"model.name_or_path={c.file('weights.bin', 'x')}"),
    "model-no-config-json": lambda c: c.inspect(
        "d.jsonl", QA_JSONL, f"model.name_or_path={c.broken_model(lambda f: (f / 'config.json').unlink())}"
    ),
    "model-config-json-invalid": lambda c: c.inspect(
        "d.jsonl", QA_JSONL, f"model.name_or_path={c.broken_model(lambda f: (f / 'config.json').write_text('{'))}"
    ),
    "model-config-json-no-type": lambda c: c.inspect(
        "d.jsonl", QA_JSONL, f"model.name_or_path={c.broken_model(lambda f: (f / 'config.json').write_text('{}'))}"
    ),
    "model-truncated-safetensors": lambda c: c.inspect(
        "d.jsonl", QA_JSONL, f"model.name_or_path={c.broken_model(_truncate)}"
    ),
    "model-empty-safetensors": lambda c: c.inspect(
        "d.jsonl", QA_JSONL, f"model.name_or_path={c.broken_model(lambda f: _truncate(f, lambda n: 0))}"
    ),
    "model-bad-tokenizer": lambda c: c.inspect(
        "d.jsonl",
        QA_JSONL,
        f"model.name_or_path={c.broken_model(lambda f: (f / 'tokenizer.json').write_text(BROKEN_JSON))}",
    ),
    # --- command-line arguments ---
    "set-without-equals": lambda c: c.train("", "train.epochs"),
    "set-empty-key": lambda c: c.train("", "=3"),
    "set-bad-key-path": lambda c: c.train("", "train..epochs=1"),
    "eval-missing-run": lambda c: ["eval", str(c.root / "runs" / "nope")],
    "eval-bad-compare": lambda c: ["eval", str(c.root / "runs" / "nope"), "--compare", "other"],
    "eval-bad-split": lambda c: ["eval", str(c.model), "--split", "bogus"],
    "eval-missing-data": lambda c: ["eval", str(c.model), "--data", str(c.root / "nope.jsonl")],
    "score-missing-predictions": lambda c: [
        "score",
        str(c.root / "p.jsonl"),
        "--data",
        str(c.file("d.jsonl", QA_JSONL)),
    ],
    "generate-missing-run": lambda c: ["generate", str(c.root / "nope"), "question?"],
    "merge-missing-run": lambda c: ["merge", str(c.root / "nope"), "--out", str(c.root / "merged")],
    # usage mistakes typer finds before any command runs
    "usage-missing-argument": lambda c: ["train"],
    "usage-unknown-option": lambda c: ["train", str(c.config()), "--bogus", "1"],
    "usage-out-of-range": lambda c: ["eval", str(c.model), "--max-examples", "0"],
    "usage-option-without-value": lambda c: ["plan", str(c.config()), "--gpu"],
    "usage-unknown-command": lambda c: ["trian", str(c.config())],
    "train-allow-config-change-without-resume": lambda c: ["train", str(c.config()), "--allow-config-change"],
    # --- training setup (nothing may be left behind: no run folder) ---
    "train-missing-data": lambda c: c.train("", f"data.path={c.root / 'missing.jsonl'}"),
    "train-truncated-model": lambda c: c.train("", f"model.name_or_path={c.broken_model(_truncate)}"),
}


def snapshot(*roots: Path) -> dict:
    """Every path under the roots with its size and modification time."""
    tree = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                stat = path.lstat()
                tree[str(path)] = (stat.st_size if name in files else None, stat.st_mtime_ns)
    return tree


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir):
    return tiny_llama_dir


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_with_a_fix_and_changes_nothing(name, tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths and default outputs land in the snapshot
    argv = [str(part) for part in CASES[name](Case(tmp_path, model_dir))]
    before = snapshot(tmp_path, model_dir)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("error: ") and " Fix: " in lines[0], err
    assert snapshot(tmp_path, model_dir) == before, "files were written or removed"


@pytest.mark.parametrize(
    "error, says",
    [
        (
            PermissionError(13, "Permission denied", "/data/locked.json"),
            "error: Permission denied: '/data/locked.json'. Fix: ",
        ),
        (IsADirectoryError(21, "Is a directory", "/data"), "error: Is a directory: '/data'. Fix: "),
        (
            UnicodeDecodeError("utf-8", b"caf\xe9", 3, 4, "invalid continuation byte"),
            "error: a file is not UTF-8 text (invalid continuation byte at byte 3). Fix: re-save it as UTF-8",
        ),
    ],
)
def test_os_errors_on_user_paths_that_no_check_caught_are_one_line(error, says, monkeypatch, capsys):
    import lorakit.cli_commands

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(lorakit.cli_commands, "generate_command", fail)
    assert main(["generate", "run", "question"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(says) and len(err.strip().splitlines()) == 1


def test_os_errors_without_a_path_are_bugs_and_keep_their_traceback(monkeypatch):
    import lorakit.cli_commands

    def fail(*args, **kwargs):
        raise FileNotFoundError("an internal file went missing")

    monkeypatch.setattr(lorakit.cli_commands, "generate_command", fail)
    with pytest.raises(FileNotFoundError):
        main(["generate", "run", "question"])
