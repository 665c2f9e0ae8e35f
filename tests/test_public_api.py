"""The public API: what `import lorakit` gives, how it is documented, and who prints.

`import lorakit` must stay light (no torch), every name in `__all__` must resolve, each public
function documents Args/Returns/Raises, every user mistake is a LorakitError, and library functions
write nothing to stdout: the CLI prints their results and shows their log lines.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lorakit
from lorakit import errors
from lorakit.cli import main

FUNCTIONS = ["load_config", "train", "evaluate", "score", "load_predictor", "merge", "plan", "fit_config"]
ERRORS = [name for name in lorakit.__all__ if name.endswith(("Error", "Interrupted"))]


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_every_name_in_all_resolves_and_dir_lists_it():
    assert set(FUNCTIONS) | {"Predictor", "__version__"} | set(ERRORS) <= set(lorakit.__all__)
    for name in lorakit.__all__:
        assert getattr(lorakit, name) is not None, name
    assert set(lorakit.__all__) <= set(dir(lorakit))
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        lorakit.nonesuch  # noqa: B018


@pytest.mark.integration  # fresh Python subprocesses
def test_import_lorakit_is_light_and_the_issue_one_liner_works():
    """No torch (nor transformers) until a function is used; `lorakit --help` loads none either."""
    result = _run_python(
        "import sys, lorakit as l\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "l.train, l.evaluate, l.Predictor\n"
        "assert 'torch' in sys.modules  # Predictor resolved for real\n"
        "from lorakit.cli import main\n"
    )
    assert result.returncode == 0, result.stderr
    result = _run_python(
        "import sys; from lorakit.cli import main; code = main(['--help']); "
        "assert 'torch' not in sys.modules and code == 0"
    )
    assert result.returncode == 0, result.stderr


def test_train_evaluate_and_plan_call_their_stage_even_after_a_submodule_import(monkeypatch):
    """The three names are also subpackages (`import lorakit.train.recipe` binds lorakit.train to
    the package): the package object itself calls the stage's function."""
    import lorakit.evaluate.runner
    import lorakit.plan.planner
    import lorakit.train.recipe

    for name, module, function in [
        ("train", lorakit.train.recipe, "train"),
        ("evaluate", lorakit.evaluate.runner, "evaluate_path"),
        ("plan", lorakit.plan.planner, "plan_run"),
    ]:
        calls = []
        monkeypatch.setattr(module, function, lambda *a, _calls=calls, **k: _calls.append((a, k)) or "result")
        assert getattr(lorakit, name)("x", flag=True) == "result" and calls == [(("x",), {"flag": True})]
        monkeypatch.undo()
        assert inspect.signature(getattr(lorakit, name)) == inspect.signature(getattr(module, function))
    assert lorakit.score is lorakit.evaluate.runner.score_predictions
    from lorakit.export.merge import merge_run
    from lorakit.inference.predictor import Predictor, load_predictor

    assert (lorakit.merge, lorakit.Predictor, lorakit.load_predictor) == (merge_run, Predictor, load_predictor)


def _doc(obj) -> str:
    return inspect.getdoc(getattr(obj, "__wrapped__", obj)) or ""


def _section(doc: str, name: str) -> str:
    """The indented block under `name:` (up to the next section or the end)."""
    match = re.search(rf"^{name}:\n((?:[ \t]+.*\n?|\n)+)", doc, flags=re.MULTILINE)
    return match.group(1) if match else ""


@pytest.mark.parametrize("name", [*FUNCTIONS, "Predictor.generate", "Predictor.stream"])
def test_public_functions_document_args_returns_and_the_errors_they_raise(name):
    obj = lorakit
    for part in name.split("."):
        obj = getattr(obj, part)
    doc = _doc(obj)
    for section in ("Args", "Returns", "Raises"):
        assert _section(doc, section).strip(), f"{name}: no {section}: section"
    # every parameter is described under Args (a shared line like "shape, lengths:" counts)
    args = _section(doc, "Args")
    params = [p for p in inspect.signature(getattr(obj, "__wrapped__", obj)).parameters if p != "self"]
    missing = [p for p in params if not re.search(rf"(^|[ ,*])\**{p}\b[^:\n]*:", args, flags=re.MULTILINE)]
    assert not missing, f"{name}: Args does not describe {missing}"
    # Raises names the lorakit errors a user mistake produces
    raised = set(re.findall(r"\b([A-Z]\w*(?:Error|Interrupted))\b", _section(doc, "Raises")))
    assert raised and raised <= set(ERRORS), f"{name}: Raises names {raised}"


def test_predictor_documents_its_arguments():
    args = _section(_doc(lorakit.Predictor), "Args")
    for param in ("model", "tokenizer", "template", "task_type", "name", "adapter_name", "max_length"):
        assert re.search(rf"^\s+{param}:", args, flags=re.MULTILINE), param


def test_errors_form_one_tree_with_the_documented_exit_codes():
    assert len(ERRORS) == 10
    for name in ERRORS:
        cls = getattr(lorakit, name)
        assert cls is getattr(errors, name) and issubclass(cls, errors.LorakitError)
        assert name in errors.__doc__  # the tree drawn in errors.py names it
        expected = 130 if name == "TrainingInterrupted" else 2
        assert cls.exit_code == expected, name
    stopped = lorakit.TrainingInterrupted("stopped by SIGTERM.", hint="resume", exit_code=143)
    assert isinstance(stopped, lorakit.RunError) and stopped.exit_code == 143
    assert str(stopped) == "stopped by SIGTERM. Fix: resume"
    from lorakit.train.recipe import TrainingInterrupted

    assert TrainingInterrupted is lorakit.TrainingInterrupted  # the old import path still works


def test_cli_exits_with_the_errors_own_code(monkeypatch, capsys):
    import lorakit.evaluate.runner

    def interrupted(*args, **kwargs):
        raise lorakit.TrainingInterrupted(
            "training interrupted (SIGTERM) at step 3.", hint="use --resume", exit_code=143
        )

    monkeypatch.setattr(lorakit.evaluate.runner, "score_predictions", interrupted)
    assert main(["score", "p.jsonl", "--data", "d.json"]) == 143
    assert capsys.readouterr().err == "error: training interrupted (SIGTERM) at step 3. Fix: use --resume\n"


SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "T",
            "paragraphs": [
                {
                    "context": "Paris is the capital of France. The sky is blue.",
                    "qas": [
                        {
                            "id": "a1",
                            "question": "What is the capital of France?",
                            "answers": [{"text": "Paris", "answer_start": 0}],
                        },
                        {
                            "id": "a2",
                            "question": "What colour is the sky?",
                            "answers": [{"text": "blue", "answer_start": 43}],
                        },
                    ],
                }
            ],
        }
    ],
}


def test_score_prints_nothing_itself_and_the_cli_prints_the_lines_it_logs(tmp_path, capsys, caplog):
    data = tmp_path / "dev.json"
    data.write_text(json.dumps(SQUAD), encoding="utf-8")
    predictions = tmp_path / "preds.json"
    predictions.write_text(json.dumps({"a1": "Paris", "a2": "green"}), encoding="utf-8")

    with caplog.at_level(logging.INFO, logger="lorakit"):
        result = lorakit.score(predictions, data, out_dir=tmp_path / "lib")
    assert capsys.readouterr() == ("", "")  # a library function: no stdout, no stderr
    logged = [r.getMessage() for r in caplog.records if r.name == "lorakit.evaluate"]
    assert logged[0] == "2 examples" and logged[1].startswith("model: EM 50.0  F1 50.0")
    assert logged[-1] == f"written: {tmp_path / 'lib'}/ (predictions.jsonl, metrics.json, report.md, report.html)"
    assert result["folder"] == str(tmp_path / "lib") and result["adapter"]["exact_match"] == 50.0

    assert main(["score", str(predictions), "--data", str(data), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [line.replace(str(tmp_path / "lib"), str(tmp_path / "cli")) for line in logged]


QA = [
    ("What is the capital of France?", "Paris"),
    ("Who wrote the book?", "the author"),
    ("What is the capital of Iran?", "Tehran"),
    ("hello there", "hi"),
]


def _train_config(tmp_path: Path, model_dir: Path) -> dict:
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in QA), encoding="utf-8")
    return {
        "data": {"path": str(data), "split": {"train": 1.0, "validation": 0.0, "test": 0.0}},
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "output_dir": str(tmp_path / "runs"),
            "run_name": "api",
            "micro_batch_size": 4,
            "max_steps": 2,
            "logging_steps": 1,
            "save_every": 1000,
        },
    }


@pytest.mark.integration  # a tiny training through the CLI
def test_train_in_process_prints_nothing_and_the_cli_shows_its_log_lines(tiny_llama_dir, tmp_path, capsys, caplog):
    """The status lines that used to be printed by the recipe are log records; `lorakit train`
    shows them on stderr (and the run folder on stdout), as before."""
    tree = _train_config(tmp_path, tiny_llama_dir)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="lorakit"):
        paths = lorakit.train(lorakit.load_config(config, ["train.run_name=api-lib"]))
    assert capsys.readouterr().out == ""
    logged = [r.getMessage() for r in caplog.records if r.name == "lorakit.train"]
    assert logged[0].startswith("train data (") and logged[-1] == f"done: adapter saved to {paths.adapter}"

    result = subprocess.run(
        [sys.executable, "-m", "lorakit.cli", "train", str(config), "--set", "train.run_name=api-cli"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "api-cli"
    assert result.stdout.strip().splitlines()[-1] == f"Run folder: {run}"
    for line in [logged[0].split(":")[0], "LoRA: ", f"done: adapter saved to {run / 'adapter'}"]:
        assert line in result.stderr, (line, result.stderr)
