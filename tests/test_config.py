"""Config: defaults < YAML < --set, every problem reported at once, did-you-mean for typos."""

from __future__ import annotations

import pytest

from lorakit.cli import main
from lorakit.config_loading import load_config, parse_overrides
from lorakit.errors import ConfigError

BASE = """
data:
  path: train.json
model:
  name_or_path: some/model
train:
  epochs: 2
"""


def write(tmp_path, text=BASE, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path)
    config = load_config(path, ["train.learning_rate=1e-3", "lora.target_modules=[q_proj, k_proj]"])
    assert config.train.epochs == 2  # from YAML
    assert config.train.learning_rate == pytest.approx(1e-3)  # from --set, parsed as a number
    assert config.lora.target_modules == ["q_proj", "k_proj"]  # --set parses YAML lists
    assert config.lora.r == 16  # code default
    assert load_config(path, ["train.epochs=5"]).train.epochs == 5  # --set beats YAML


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, BASE + "lora:\n  r: 0\n  alpah: 8\ntrian:\n  epochs: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 3
    text = " ".join(problems)
    assert "lora.r" in text and "greater than or equal to 1" in text
    assert "lora.alpah: unknown key (did you mean 'lora.alpha'?)" in text
    assert "trian: unknown key (did you mean 'train'?)" in text


def test_missing_required_key_names_it(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: x\n")
    with pytest.raises(ConfigError, match=r"data: required but missing"):
        load_config(path)


def test_split_fractions_must_sum_to_one(tmp_path):
    path = write(tmp_path, BASE + "  \n")
    with pytest.raises(ConfigError, match="sum to 1.2"):
        load_config(path, ["data.split.train=1.0", "data.split.validation=0.1", "data.split.test=0.1"])


def test_bad_yaml_names_line(tmp_path):
    path = write(tmp_path, "data:\n  path: [unclosed\nmodel: x\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_config(path)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="has no '='"):
        parse_overrides(["train.epochs"])


def test_relative_data_path_resolves_next_to_config(tmp_path):
    (tmp_path / "train.json").write_text("[]", encoding="utf-8")
    config = load_config(write(tmp_path))
    assert config.data.path == str(tmp_path / "train.json")


def test_cli_reports_config_errors_in_one_line_without_traceback(tmp_path, capsys):
    path = write(tmp_path, BASE + "lora:\n  rank: 8\n")
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ")
    assert "lora.rank: unknown key" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_missing_config_file(tmp_path, capsys):
    code = main(["plan", str(tmp_path / "nope.yaml")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_config_reference_is_up_to_date():
    from pathlib import Path

    from lorakit.config_reference import render_reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text(encoding="utf-8") == render_reference(), (
        "docs/config.md is stale: run `python -m lorakit.config_reference > docs/config.md`"
    )


def test_names_are_checked_against_the_libraries_at_load(tmp_path):
    path = write(tmp_path)
    overrides = [
        "train.optimizer=adamw",
        "train.lr_scheduler=cosin",
        "train.report_to=[tensorbord]",
        "train.best_metric=eval_accuracy",
        "eval.bleu_tokenize=klingon",
        "train.learning_rate=.inf",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    text = " ".join(info.value.problems)
    for key in (
        "train.optimizer",
        "train.lr_scheduler",
        "train.report_to",
        "train.best_metric",
        "eval.bleu_tokenize",
        "train.learning_rate",
    ):
        assert key in text
    assert len(info.value.problems) == 6  # all at once
    assert "did you mean 'adamw_torch'?" in info.value.hint and "did you mean 'tensorboard'?" in info.value.hint
    assert "did you mean 'cosine'?" in info.value.hint and "13a" in info.value.hint


def test_defaults_that_skip_the_transformers_lookup_are_valid_names():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from lorakit.config import DEFAULT_NAMES, TrainConfig

    assert DEFAULT_NAMES["optimizer"] in [o.value for o in OptimizerNames]
    assert DEFAULT_NAMES["lr_scheduler"] in [s.value for s in SchedulerType]
    assert (
        TrainConfig().optimizer == DEFAULT_NAMES["optimizer"]
        and TrainConfig().lr_scheduler == DEFAULT_NAMES["lr_scheduler"]
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.best_metric=eval_f1"], "need train.generation_eval_every"),
        (["train.best_metric=exact_match"], "need train.generation_eval_every"),
        (
            ["train.eval_every=4", "train.save_every=6"],
            r"save_every \(6\) must be a multiple of train.eval_every \(4\)",
        ),
        (
            ["train.generation_eval_every=4", "train.save_every=6", "train.best_metric=f1"],
            "multiple of train.generation_eval_every",
        ),
    ],
)
def test_best_checkpoint_settings_are_checked_at_load(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path), overrides)
    assert info.value.hint


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.best_metric=f1", "train.generation_eval_every=5"],
        ["train.best_metric=eval_exact_match", "train.generation_eval_every=5", "train.save_every=10"],
        ["train.eval_every=4", "train.save_every=6", "train.best_metric=null"],
        [
            "train.report_to=[tensorboard]",
            "train.optimizer=sgd",
            "train.lr_scheduler=linear",
            "eval.bleu_tokenize=intl",
        ],
    ],
)
def test_valid_settings_still_load(tmp_path, overrides):
    load_config(write(tmp_path), overrides)


def test_assignment_is_checked_too(tmp_path):
    from pydantic import ValidationError

    config = load_config(write(tmp_path))
    with pytest.raises(ValidationError, match="unknown optimizer"):
        config.train.optimizer = "adamw_fancy"


def test_latin1_and_utf16_config_files_name_the_problem(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(BASE.replace("some/model", "caf\xe9").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"line 5 holds the byte 0xe9, which is not UTF-8") as info:
        load_config(latin)
    assert "UTF-8" in info.value.hint
    wide = tmp_path / "wide.yaml"
    wide.write_bytes(BASE.encode("utf-16"))
    with pytest.raises(ConfigError, match="encoded as UTF-16"):
        load_config(wide)


def test_duplicate_yaml_keys_warn_with_the_line(tmp_path, caplog):
    path = write(tmp_path, BASE + "  epochs: 4\n")
    with caplog.at_level("WARNING", logger="lorakit.config"):
        config = load_config(path)
    assert config.train.epochs == 4  # the last value wins
    assert "config.yaml line 8: duplicate key 'epochs'" in caplog.text


def test_output_dir_under_a_file_is_a_config_error(tmp_path):
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    for output in ("afile", "afile/deeper"):
        with pytest.raises(ConfigError, match="is a file"):
            load_config(write(tmp_path), [f"train.output_dir={tmp_path / output}"])


def test_bad_set_keys_are_config_errors():
    for item in ("=3", "train..epochs=2", ".x=1"):
        with pytest.raises(ConfigError, match="is not a key"):
            parse_overrides([item])
