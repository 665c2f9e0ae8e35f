"""Nothing the user had is lost: every evaluation is kept, `eval --out` writes only there, a merge
never writes over the run or its base model, and a run whose base model changed is refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny import build_tiny_llama, make_run

from lorakit.cli import main
from lorakit.config_loading import validate_config
from lorakit.errors import ModelError
from lorakit.evaluate import history

QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("Who wrote the book?", "the author"),
    ("What color is the sky?", "blue"),
    ("How many legs has a dog?", "four"),
]


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below folder."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_error_line(capsys) -> str:
    """The command printed one `error: ... Fix: ...` line and nothing else (no progress, no traceback)."""
    out, err = capsys.readouterr()
    err = err.strip()
    assert out == "", out
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and " Fix: " in err, err
    assert "Traceback" not in err
    return err


@pytest.fixture()
def base(tiny_llama_dir, tmp_path) -> Path:
    """A base model of this test's own (copied, so a test may change it)."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "base"))


@pytest.fixture()
def run(base, tmp_path) -> Path:
    """A run on `base` whose config splits a small QA file into train/validation/test."""
    root = make_run(tmp_path / "runs" / "qa", base)
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"{q} ({i})", "answer": a}) + "\n"
            for i, (q, a) in enumerate(QUESTIONS * 2)
        )
    )
    config = validate_config(
        {
            "data": {
                "path": str(data),
                "split": {"train": 0.5, "validation": 0.25, "test": 0.25},
                "split_by": "record",
            },
            "model": {"name_or_path": str(base)},
            "template": {"name": "question_answer"},
            "eval": {"max_new_tokens": 4, "batch_size": 4},
        }
    )
    (root / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    return root


# --- evaluations are kept -----------------------------------------------------------------------


def test_eval_twice_keeps_both_and_the_base_comparison(run, capsys):
    assert main(["eval", str(run), "--split", "test", "--compare", "base"]) == 0
    first = json.loads((run / "eval" / "index.json").read_text())["latest"]
    kept = snapshot(run / "eval" / first)
    assert main(["eval", str(run), "--split", "validation"]) == 0

    index = json.loads((run / "eval" / "index.json").read_text())
    folders = sorted(p.name for p in (run / "eval").iterdir() if p.is_dir())
    assert [e["folder"] for e in index["evaluations"]] == [first, index["latest"]]
    assert sorted([first, index["latest"]]) == folders
    assert first.startswith("test-") and index["latest"].startswith("validation-")
    assert snapshot(run / "eval" / first) == kept  # the first evaluation, untouched
    test_entry, validation_entry = index["evaluations"]
    first_metrics = json.loads((run / "eval" / first / "metrics.json").read_text())
    assert first_metrics["base"] is not None and test_entry["base"]["f1"] == first_metrics["base"]["f1"]
    assert test_entry["adapter"]["f1"] == first_metrics["adapter"]["f1"]
    assert (test_entry["split"], validation_entry["split"], validation_entry["base"]) == ("test", "validation", None)
    assert f"eval/{index['latest']}/" in capsys.readouterr().out


def test_two_evaluations_in_one_second_get_two_folders(tmp_path):
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    made = []
    for text in ("first", "second"):
        with history.staging(tmp_path / "eval") as tmp:
            (tmp / "metrics.json").write_text(json.dumps({"created": "x", "n": text}))
            made.append(history.publish_new(tmp, tmp_path / "eval", "test", now=now))
    assert [p.name for p in made] == ["test-20260102T030405Z", "test-20260102T030405Z-2"]
    assert [json.loads((p / "metrics.json").read_text())["n"] for p in made] == ["first", "second"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [p.name for p in made]  # no temporary left


def test_eval_out_writes_only_there(run, tmp_path, capsys):
    before = snapshot(run)
    out = tmp_path / "mine"
    assert main(["eval", str(run), "--split", "test", "--out", str(out)]) == 0
    assert {"predictions.jsonl", "metrics.json", "report.md", "report.html"} <= set(snapshot(out))
    assert snapshot(run) == before and not (run / "eval").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # a second --out to the same folder is refused, and the folder is left as it was
    written = snapshot(out)
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "test", "--out", str(out)]) == 2
    assert "--out" in one_error_line(capsys) and snapshot(out) == written


def test_a_failed_evaluation_leaves_nothing(run, monkeypatch):
    from lorakit.evaluate import report
    from lorakit.evaluate.runner import evaluate_path

    real = report.write_eval_outputs

    def write_then_fail(folder, **kwargs):
        real(folder, **kwargs)
        raise OSError("disk full")

    assert main(["eval", str(run), "--split", "test"]) == 0
    before = snapshot(run)
    monkeypatch.setattr(report, "write_eval_outputs", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        evaluate_path(run, split="validation", verbose=False)
    assert snapshot(run) == before
    assert not [p for p in (run / "eval").iterdir() if p.name.startswith(".")]


# --- merge never writes over the run or its base -----------------------------------------------


@pytest.mark.parametrize("where", ["base", "symlink to base", "folder holding base", "inside base", "inside run"])
def test_merge_onto_the_base_or_the_run_is_refused(where, base, run, tmp_path, capsys):
    out = {
        "base": base,
        "symlink to base": tmp_path / "link",
        "folder holding base": tmp_path,
        "inside base": base / "merged",
        "inside run": run / "merged",
    }[where]
    if where == "symlink to base":
        out.symlink_to(base, target_is_directory=True)
    base_before, run_before = snapshot(base), snapshot(run)
    capsys.readouterr()
    assert main(["merge", str(run), "--out", str(out), "--overwrite"]) == 2
    err = one_error_line(capsys)
    assert "--out" in err and ("base model" in err if "base" in where else "the run" in err)
    assert snapshot(base) == base_before and snapshot(run) == run_before


# --- a changed base is refused on load ---------------------------------------------------------


def test_a_changed_base_is_refused_with_the_fix(base, run, tmp_path, capsys):
    from lorakit.export.merge import merge_run
    from lorakit.inference.predictor import load_predictor

    original = (base / "model.safetensors").read_bytes()
    other = build_tiny_llama(tmp_path / "other", seed=1)
    shutil.copyfile(other / "model.safetensors", base / "model.safetensors")  # same size, other weights
    capsys.readouterr()
    assert main(["generate", str(run), "What is the capital of France?"]) == 2
    err = one_error_line(capsys)
    assert "changed since" in err and str(base) in err and "retrain" in err
    with pytest.raises(ModelError, match="changed since"):
        load_predictor(run, device="cpu")
    with pytest.raises(ModelError, match="changed since"):
        merge_run(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

    (base / "model.safetensors").write_bytes(original)  # restored: same bytes, new mtime
    assert main(["generate", str(run), "What is the capital of France?", "--max-new-tokens", "2"]) == 0


def test_weights_are_hashed_only_when_size_or_mtime_changed(base, run, tmp_path, monkeypatch):
    import lorakit.files as files
    from lorakit.inference.predictor import load_predictor

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    calls = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda path: calls.append(path) or real(path))

    load_predictor(run, device="cpu")
    assert calls == []  # untouched since training: size and mtime match lorakit.json
    weights = base / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    load_predictor(run, device="cpu")
    assert calls == [weights]
    load_predictor(run, device="cpu")
    assert calls == [weights]  # the digest was cached for this size, mtime and inode


def test_a_hub_base_must_load_the_recorded_commit():
    from lorakit.models.identity import check_base_revision

    commit = "a" * 40
    info = SimpleNamespace(root=Path("runs/x"), base={"name_or_path": "org/model", "revision": commit, "sha256": None})

    def model(loaded):
        return SimpleNamespace(config=SimpleNamespace(_commit_hash=loaded))

    check_base_revision(info, model(commit))
    check_base_revision(info, model(None))  # offline loaders may not say which commit they read
    with pytest.raises(ModelError, match="b{40}") as raised:
        check_base_revision(info, model("b" * 40))
    assert commit in str(raised.value) and raised.value.hint
    check_base_revision(
        SimpleNamespace(root=Path("r"), base={"name_or_path": "org/model", "revision": "main"}), model("b" * 40)
    )  # no commit was recorded: nothing to compare
