from __future__ import annotations

import json

import pytest

from lorakit.config_loading import validate_config
from lorakit.errors import RunError
from lorakit.files import atomic_write_json, atomic_write_text
from lorakit.prompting.templates import Template
from lorakit.run_metadata import read_run, write_metadata
from lorakit.runs import RunPaths, mark_checkpoint_complete, prepare_run_dir, run_dir_for

TEMPLATE = Template(
    name="question_answer",
    source="{% for m in messages %}{{ m.content }}{% endfor %}",
    stop_strings=["\n### Question:"],
    uses_model_chat_template=False,
    system="Be brief.",
)
BASE = {"name_or_path": "/models/tiny", "gguf_file": None, "revision": None, "sha256": "ab" * 32}


def _config(tmp_path, **train):
    return validate_config(
        {
            "data": {"path": "data/faq.jsonl"},
            "model": {"name_or_path": "org/Tiny-Model"},
            "train": {"output_dir": str(tmp_path), **train},
        }
    )


def _finished_run(root, config=None):
    paths = RunPaths(root)
    paths.adapter.mkdir(parents=True)
    (paths.adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (paths.adapter / "adapter_config.json").write_text("{}")
    write_metadata(
        paths.adapter,
        base=BASE,
        task_type="causal",
        template=TEMPLATE,
        precision="float32",
        max_length=256,
        extra={"train_examples": 4},
    )
    if config is not None:
        atomic_write_text(paths.config, config.to_yaml())
    return paths


def test_a_run_folder_is_self_contained_and_resumes_from_its_newest_complete_checkpoint(tmp_path):
    paths = RunPaths(tmp_path / "r")
    parts = [
        paths.config,
        paths.adapter,
        paths.checkpoints,
        paths.metrics,
        paths.config_changes,
        paths.plots,
        paths.eval,
        paths.lorakit_json,
    ]
    # a run can be moved or copied as one folder: every part lives under its root, no two share a path
    assert all(part.is_relative_to(paths.root) for part in parts) and len(set(parts)) == len(parts)
    assert not paths.is_finished() and paths.latest_checkpoint() is None
    for step in (2, 9, 10):
        (paths.checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        mark_checkpoint_complete(paths.checkpoints / f"checkpoint-{step}", step)
    (paths.checkpoints / "checkpoint-11").mkdir()  # a kill during its save: no marker
    (paths.checkpoints / "checkpoint-12").mkdir()
    mark_checkpoint_complete(paths.checkpoints / "checkpoint-12", 3)  # a marker copied from another step
    (paths.checkpoints / "checkpoint-final").mkdir()  # not a step: ignored
    moved = RunPaths(tmp_path / "moved")
    paths.root.rename(moved.root)
    # numeric order (a lexical one would pick 9), the incomplete ones never
    assert moved.latest_checkpoint() == moved.checkpoints / "checkpoint-10"
    assert moved.incomplete_checkpoints() == [moved.checkpoints / "checkpoint-11", moved.checkpoints / "checkpoint-12"]


def test_atomic_writes_replace_and_leave_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "x.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": "ب"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": "ب"}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_metadata_round_trip_from_run_adapter_and_merged(tmp_path):
    config = _config(tmp_path)
    paths = _finished_run(tmp_path / "run", config)
    meta = json.loads(paths.lorakit_json.read_text())
    assert meta["base_model"] == BASE and meta["task_type"] == "causal"
    assert meta["template"]["source"] == TEMPLATE.source and meta["train_examples"] == 4
    assert {"lorakit_version", "precision", "max_length", "created"} <= set(meta)
    # the system prompt is stored once, in the template
    assert meta["template"]["system"] == "Be brief." and "system_prompt" not in meta

    for where in (paths.root, paths.adapter):
        info = read_run(where)
        assert info.root == paths.root and info.adapter_dir == paths.adapter
        assert info.template == TEMPLATE and info.max_length == 256 and info.system_prompt == "Be brief."
        assert info.config is not None and info.config.model.name_or_path == "org/Tiny-Model"

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "lorakit.json").write_text(paths.lorakit_json.read_text())
    info = read_run(merged)
    assert info.is_merged and info.adapter_dir is None and info.config is None
    assert info.base["sha256"] == BASE["sha256"]


def test_reads_a_0_1_0_lorakit_json_with_two_system_prompts(tmp_path):
    """lorakit 0.1.0 wrote the system prompt twice (template.system and a top-level system_prompt,
    which its predictor preferred) and may lack max_length: both read back into the one place."""
    paths = _finished_run(tmp_path / "old")
    meta = json.loads(paths.lorakit_json.read_text())
    meta["system_prompt"] = "Answer in one word."
    del meta["max_length"]
    paths.lorakit_json.write_text(json.dumps(meta))
    info = read_run(paths.root)
    assert info.template.system == "Answer in one word." == info.system_prompt
    assert info.max_length == 1024  # TemplateConfig's default: no config.yaml in this folder
    config = _config(tmp_path)
    config.template.max_length = 300
    atomic_write_text(paths.config, config.to_yaml())
    assert read_run(paths.root).max_length == 300  # the run's own config.yaml, when it has one


def test_read_run_errors_name_the_path_and_fix(tmp_path):
    with pytest.raises(RunError, match="does not exist.*train first"):
        read_run(tmp_path / "missing")
    with pytest.raises(RunError, match="is not a lorakit run"):
        read_run(tmp_path)
    unfinished = RunPaths(tmp_path / "unfinished")
    (unfinished.checkpoints / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(RunError, match="incomplete.*--resume"):
        read_run(unfinished.root)
    no_weights = _finished_run(tmp_path / "noweights")
    (no_weights.adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(RunError, match="no adapter_model.safetensors"):
        read_run(no_weights.root)


def test_prepare_run_dir_never_overwrites_a_finished_run(tmp_path):
    paths = _finished_run(tmp_path / "done")
    with pytest.raises(RunError, match="already holds a finished adapter.*overwrite=true"):
        prepare_run_dir(paths.root, resume=False, overwrite=False)
    staged = prepare_run_dir(paths.root, resume=False, overwrite=True)
    # an overwrite trains beside the old run, which stays whole until the new one is published
    assert staged.root == tmp_path / ".done.overwrite" and staged.publish_to == paths.root and not staged.root.exists()
    with pytest.raises(RunError, match="already finished.*run_name=NEW"):
        prepare_run_dir(paths.root, resume=True, overwrite=False)
    with pytest.raises(RunError, match="cannot resume.*no complete checkpoint"):
        prepare_run_dir(tmp_path / "fresh", resume=True, overwrite=False)
    half = RunPaths(tmp_path / "half")
    for step in (3, 12):
        (half.checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        mark_checkpoint_complete(half.checkpoints / f"checkpoint-{step}", step)
    (half.checkpoints / "checkpoint-20").mkdir()  # a save that never finished
    assert half.latest_checkpoint().name == "checkpoint-12"
    assert [f.name for f in half.incomplete_checkpoints()] == ["checkpoint-20"]
    with pytest.raises(RunError, match="unfinished run.*--resume"):
        prepare_run_dir(tmp_path / "half", resume=False, overwrite=False)
    assert prepare_run_dir(tmp_path / "half", resume=True, overwrite=False).root == tmp_path / "half"


def test_run_dir_for_is_stable_and_respects_run_name(tmp_path):
    assert run_dir_for(_config(tmp_path)) == tmp_path / "Tiny-Model-faq"
    assert run_dir_for(_config(tmp_path, run_name="my run/1")) == tmp_path / "my-run-1"
