"""Config: defaults < YAML < --set, every problem reported at once, did-you-mean for typos."""

from __future__ import annotations

import pytest

from lorakit.cli import main
from lorakit.config import load_config, parse_overrides
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
    assert "lora.alpah: unknown key. Did you mean 'lora.alpha'?" in text
    assert "trian: unknown key. Did you mean 'train'?" in text


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
